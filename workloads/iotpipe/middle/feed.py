"""The durable feed for storage consumer groups (sans-I/O).

A cursor per group (the contiguous acked prefix, persisted by the shell as the queue consumer
named after the group), leases of delivered ranges per consumer with a timeout, out-of-order
acks merged so the cursor only moves over contiguous acked ranges, and credit windows.

Credit is a *window*, not an increment: ``credit`` in a feed request is the number of
delivered-but-unacknowledged records the consumer is willing to hold. Each request replaces
the previous credit, so a periodic heartbeat that repeats the same credit never over-grants.
A consumer with free window and nothing to read gets data as soon as it is appended (long
poll: the shell asks for deliveries after every append).

A lease returns to the group's redelivery pool (served first, lowest first, to any consumer
of the group) when it expires, when its consumer shows up from a new ZeroMQ peer (it
reconnected), when its consumer is silent for longer than ``consumer_timeout``, or when the
shell reports its peer gone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from iotpipe import wire
from iotpipe.middle.intervals import IntervalSet

__all__ = ["ConsumerState", "FeedCore", "FeedCounters", "Lease", "UnknownGroup"]


class UnknownGroup(KeyError):
    """A feed request named a consumer group this middle does not serve."""


@dataclass(eq=False)
class Lease:
    """A delivered range ``first..last`` of a group, held by one consumer until acked."""

    group: str
    consumer: str
    peer: bytes
    first: int
    last: int
    deadline: float

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass(eq=False)
class ConsumerState:
    name: str
    peer: bytes
    credit: int
    last_seen: float
    outstanding: int = 0  # records leased to this consumer and not yet acked
    records_version: int = 1  # the delivery format it reads (from its latest request)


@dataclass
class FeedCounters:
    requests: int = 0
    deliveries: int = 0
    delivered_records: int = 0
    redelivered_records: int = 0  # records returned to the pool after a lease was lost
    acked_records: int = 0
    ignored_acks: int = 0  # ack ranges above the log tail


class _Group:
    def __init__(self, name: str, cursor: int) -> None:
        self.name = name
        self.cursor = cursor  # every seq <= cursor is acked
        self.acked = IntervalSet()  # acked ranges above cursor (out of order)
        self.pending = IntervalSet()  # ranges below next_new waiting for (re)delivery
        self.next_new = cursor + 1  # lowest seq never delivered by this process
        self.leases: list[Lease] = []
        self.consumers: dict[str, ConsumerState] = {}
        self.turn = 0  # round-robin position among consumers


class FeedCore:
    """Credit, leases, acks and cursors of the durable feed (see the module docstring)."""

    def __init__(
        self,
        groups: Mapping[str, int],
        *,
        lease_timeout: float = 30.0,
        consumer_timeout: float = 30.0,
        max_records: int = 512,
    ) -> None:
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        self.lease_timeout = lease_timeout
        self.consumer_timeout = consumer_timeout
        self.max_records = max_records
        self.counters = FeedCounters()
        self._groups = {name: _Group(name, cursor) for name, cursor in groups.items()}

    # state the shell reads

    @property
    def groups(self) -> list[str]:
        return list(self._groups)

    def cursor(self, group: str) -> int:
        return self._group(group).cursor

    def lag(self, group: str, tail: int) -> int:
        """Records appended but not yet acknowledged by ``group``."""
        g = self._group(group)
        return max(0, tail - g.cursor) - g.acked.count()

    def leases(self, group: str) -> list[Lease]:
        return list(self._group(group).leases)

    def consumer_count(self, group: str) -> int:
        return len(self._group(group).consumers)

    def consumer(self, group: str, name: str) -> ConsumerState | None:
        return self._group(group).consumers.get(name)

    def _group(self, name: str) -> _Group:
        try:
            return self._groups[name]
        except KeyError:
            raise UnknownGroup(name) from None

    # events

    def on_request(self, peer: bytes, request: wire.FeedRequest, now: float, tail: int) -> None:
        """A consumer's feed request: apply its acks, then adopt its credit window.

        Raises ``UnknownGroup`` for a group that is not served (nothing changes).
        """
        g = self._group(request.group)
        self.counters.requests += 1
        state = g.consumers.get(request.consumer)
        if state is not None and state.peer != peer:
            # Same consumer, new socket: it restarted, so what it held is lost.
            self._release(g, lambda lease: lease.consumer == request.consumer)
            state.peer = peer
        if state is None:
            state = g.consumers[request.consumer] = ConsumerState(
                request.consumer, peer, request.credit, now)
        for first, last in request.acks:
            self._ack(g, first, last, tail)
        state.credit = request.credit
        state.records_version = request.records_version
        state.last_seen = now

    def skip(self, group: str, first: int, last: int, tail: int) -> None:
        """Treat ``first..last`` as done: the log no longer holds it (never expected)."""
        self._ack(self._group(group), first, last, tail)

    def _ack(self, g: _Group, first: int, last: int, tail: int) -> None:
        if last > tail:
            self.counters.ignored_acks += 1
            last = tail
        first = max(first, g.cursor + 1)
        if first > last:
            return
        newly = g.acked.uncovered(first, last)
        self.counters.acked_records += sum(b - a + 1 for a, b in newly)
        g.acked.add(first, last)
        g.pending.remove(first, last)
        kept: list[Lease] = []
        for lease in g.leases:
            if lease.last < first or lease.first > last:
                kept.append(lease)
                continue
            overlap = min(last, lease.last) - max(first, lease.first) + 1
            owner = g.consumers.get(lease.consumer)
            if owner is not None and owner.peer == lease.peer:
                owner.outstanding -= overlap
            if lease.first < first:
                kept.append(Lease(g.name, lease.consumer, lease.peer, lease.first, first - 1,
                                  lease.deadline))
            if lease.last > last:
                kept.append(Lease(g.name, lease.consumer, lease.peer, last + 1, lease.last,
                                  lease.deadline))
        g.leases = kept
        lowest = g.acked.lowest()
        if lowest is not None and lowest[0] == g.cursor + 1:
            g.cursor = lowest[1]
            g.acked.remove(*lowest)
        g.next_new = max(g.next_new, g.cursor + 1)

    def _release(self, g: _Group, which: Callable[[Lease], bool]) -> int:
        """Return matching leases to the pending pool; the number of records returned."""
        kept: list[Lease] = []
        returned = 0
        for lease in g.leases:
            if which(lease):
                g.pending.add(lease.first, lease.last)
                returned += lease.count
                owner = g.consumers.get(lease.consumer)
                if owner is not None and owner.peer == lease.peer:
                    owner.outstanding -= lease.count
            else:
                kept.append(lease)
        g.leases = kept
        self.counters.redelivered_records += returned
        return returned

    def peer_gone(self, peer: bytes) -> int:
        """The shell could not reach ``peer``: forget its consumers, release their leases."""
        returned = 0
        for g in self._groups.values():
            returned += self._release(g, lambda lease: lease.peer == peer)
            for name in [n for n, c in g.consumers.items() if c.peer == peer]:
                del g.consumers[name]
        return returned

    def expire(self, now: float) -> int:
        """Release expired leases and silent consumers; the number of records returned."""
        returned = 0
        for g in self._groups.values():
            silent = {n for n, c in g.consumers.items()
                      if now - c.last_seen > self.consumer_timeout}
            returned += self._release(
                g, lambda lease, silent=silent: lease.deadline <= now or lease.consumer in silent)
            for name in silent:
                del g.consumers[name]
        return returned

    def next_delivery(self, now: float, tail: int) -> Lease | None:
        """The next range to send (already leased), or None when nothing can be sent now.

        The shell reads up to ``lease.count`` records from ``lease.first``, sends them to
        ``lease.peer`` and calls ``shrink`` if it sent fewer.
        """
        for g in self._groups.values():
            consumers = list(g.consumers.values())
            for k in range(len(consumers)):
                state = consumers[(g.turn + k) % len(consumers)]
                window = min(state.credit - state.outstanding, self.max_records)
                if window <= 0 or now - state.last_seen > self.consumer_timeout:
                    continue
                span = self._take(g, window, tail)
                if span is None:
                    break  # nothing to read for this group: no other consumer will do better
                g.turn = (g.turn + k + 1) % len(consumers)
                lease = Lease(g.name, state.name, state.peer, span[0], span[1],
                              now + self.lease_timeout)
                g.leases.append(lease)
                state.outstanding += lease.count
                self.counters.deliveries += 1
                self.counters.delivered_records += lease.count
                return lease
        return None

    def _take(self, g: _Group, window: int, tail: int) -> tuple[int, int] | None:
        lowest = g.pending.lowest()
        if lowest is not None:
            first, last = lowest[0], min(lowest[1], lowest[0] + window - 1)
            g.pending.remove(first, last)
            return first, last
        while True:  # skip ranges acked ahead of delivery (acks from before a restart)
            acked = g.acked.range_containing(g.next_new)
            if acked is None:
                break
            g.next_new = acked[1] + 1
        if g.next_new > tail:
            return None
        first = g.next_new
        last = min(tail, first + window - 1)
        next_acked = g.acked.next_start_after(first)
        if next_acked is not None:
            last = min(last, next_acked - 1)
        g.next_new = last + 1
        return first, last

    def records_version(self, lease: Lease) -> int:
        """The delivery format for ``lease``: what its consumer said it reads."""
        owner = self._group(lease.group).consumers.get(lease.consumer)
        return owner.records_version if owner is not None else 1

    def fit_read(self, lease: Lease, first_read: int | None, count: int, tail: int
                 ) -> tuple[int, int] | None:
        """The shell read ``count`` records for a fresh ``lease``, from log seq ``first_read``.

        When the read starts at ``lease.first``, the lease shrinks to what was read and None
        is returned: send it. Otherwise (``first_read`` None: nothing read) the log no longer
        holds the lease's start, which only a bug or a damaged ledger can cause: the lease is
        dropped and the missing range, returned for the shell to report, counts as done, so
        the feed moves on instead of asking for it forever.
        """
        if first_read == lease.first and count > 0:
            self.shrink(lease, min(count, lease.count))
            return None
        gone_last = first_read - 1 if first_read is not None else lease.last
        self.shrink(lease, 0)
        self.skip(lease.group, lease.first, gone_last, tail)
        return lease.first, gone_last

    def shrink(self, lease: Lease, sent: int) -> None:
        """Only ``sent`` records of a fresh lease went out; the rest go back to the pool."""
        if not 0 <= sent <= lease.count:
            raise ValueError(f"sent must be within 0..{lease.count}, got {sent}")
        if sent == lease.count:
            return
        g = self._group(lease.group)
        g.pending.add(lease.first + sent, lease.last)
        owner = g.consumers.get(lease.consumer)
        if owner is not None and owner.peer == lease.peer:
            owner.outstanding -= lease.count - sent
        self.counters.delivered_records -= lease.count - sent
        if sent == 0:
            g.leases.remove(lease)
            self.counters.deliveries -= 1
        else:
            lease.last = lease.first + sent - 1
