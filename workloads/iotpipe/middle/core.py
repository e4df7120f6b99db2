"""Sans-I/O state machines of the middle tier: no sockets, no files, no clocks.

Three pieces, each driven by the I/O shell in ``server.py`` and tested without sockets:

``NodeMarks``
    Per ingest node, the set of node sequence numbers already stored in the middle log.
    In the normal case this is one range ``[first_seen, high_water_mark]``: a node sends to
    one middle at a time, in sequence order, and resends everything unacknowledged from the
    lowest on failover. A batch entirely inside the marks is a duplicate (acknowledged, not
    stored); a batch straddling the high-water mark stores only the new part.

    The marks are a set of ranges rather than a single number because a plain high-water
    mark loses data when a batch *skips ahead*: if batch 3 of a window is lost in a dropped
    TCP connection (or refused with ``busy``) and batch 4 is stored, a single mark of 4 would
    make the resent batch 3 look like a duplicate. With ranges, the hole stays open and the
    resent batch 3 is stored. Holes that legitimately never fill (a node failed over to
    another middle for a while, then came back) are bounded: beyond ``max_ranges`` per node
    the oldest hole is closed, on the grounds that a node never resends what it saw
    acknowledged long ago.

``Intake``
    Turns the batches that arrived together into one group-commit plan (the log records to
    append and, per batch, which readings are new), then into ``ack`` replies once the
    append returned, or ``busy`` replies when it could not be stored.

``FeedCore``
    The durable feed for storage consumer groups: a cursor per group (the contiguous acked
    prefix, persisted by the shell as the queue consumer named after the group), leases of
    delivered ranges per consumer with a timeout, out-of-order acks merged so the cursor only
    moves over contiguous acked ranges, and credit windows.

    Credit is a *window*, not an increment: ``credit`` in a feed request is the number of
    delivered-but-unacknowledged records the consumer is willing to hold. Each request
    replaces the previous credit, so a periodic heartbeat that repeats the same credit never
    over-grants. A consumer with free window and nothing to read gets data as soon as it is
    appended (long poll: the shell asks for deliveries after every append).

    A lease returns to the group's redelivery pool (served first, lowest first, to any
    consumer of the group) when it expires, when its consumer shows up from a new ZeroMQ
    peer (it reconnected), when its consumer is silent for longer than ``consumer_timeout``,
    or when the shell reports its peer gone.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import google_crc32c
import msgpack

from iotpipe import wire

__all__ = [
    "CheckpointError",
    "ConsumerState",
    "FeedCore",
    "FeedCounters",
    "Intake",
    "IntakeCounters",
    "IntakePlan",
    "IntervalSet",
    "Lease",
    "MarksCheckpoint",
    "NodeMarks",
    "PlannedBatch",
    "RecentRecords",
    "Reply",
    "UnknownGroup",
    "decode_checkpoint",
    "encode_checkpoint",
    "reading_topic",
]


# -- interval sets -----------------------------------------------------------------------


class IntervalSet:
    """A set of integers stored as sorted, disjoint, non-adjacent closed ranges."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for first, last in ranges:
            self.add(first, last)

    def copy(self) -> IntervalSet:
        other = IntervalSet()
        other._starts = self._starts.copy()
        other._ends = self._ends.copy()
        return other

    def add(self, first: int, last: int) -> None:
        if first > last:
            raise ValueError(f"empty range [{first}, {last}]")
        starts, ends = self._starts, self._ends
        if not ends or first > ends[-1] + 1:  # fast path: appending past the end
            starts.append(first)
            ends.append(last)
            return
        # Ranges [i, j) overlap or touch [first, last]; they merge into one.
        i = bisect_left(ends, first - 1)
        j = bisect_right(starts, last + 1)
        if i < j:
            first = min(first, starts[i])
            last = max(last, ends[j - 1])
        starts[i:j] = [first]
        ends[i:j] = [last]

    def remove(self, first: int, last: int) -> None:
        if first > last:
            return
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, first)
        j = bisect_right(starts, last)
        if i >= j:
            return
        new_starts: list[int] = []
        new_ends: list[int] = []
        if starts[i] < first:
            new_starts.append(starts[i])
            new_ends.append(first - 1)
        if ends[j - 1] > last:
            new_starts.append(last + 1)
            new_ends.append(ends[j - 1])
        starts[i:j] = new_starts
        ends[i:j] = new_ends

    def uncovered(self, first: int, last: int) -> list[tuple[int, int]]:
        """The sub-ranges of ``[first, last]`` that are not in the set, in order."""
        out: list[tuple[int, int]] = []
        starts, ends = self._starts, self._ends
        pos = first
        i = bisect_left(ends, first)
        while i < len(starts) and starts[i] <= last:
            if starts[i] > pos:
                out.append((pos, starts[i] - 1))
            pos = max(pos, ends[i] + 1)
            i += 1
        if pos <= last:
            out.append((pos, last))
        return out

    def covers(self, first: int, last: int) -> bool:
        i = bisect_left(self._ends, first)
        return i < len(self._starts) and self._starts[i] <= first and self._ends[i] >= last

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.covers(value, value)

    def range_containing(self, value: int) -> tuple[int, int] | None:
        i = bisect_left(self._ends, value)
        if i < len(self._starts) and self._starts[i] <= value:
            return self._starts[i], self._ends[i]
        return None

    def next_start_after(self, value: int) -> int | None:
        """The start of the first range that begins after ``value``."""
        i = bisect_right(self._starts, value)
        return self._starts[i] if i < len(self._starts) else None

    def lowest(self) -> tuple[int, int] | None:
        return (self._starts[0], self._ends[0]) if self._starts else None

    def highest(self) -> int:
        """The largest member, or 0 for an empty set."""
        return self._ends[-1] if self._ends else 0

    def close_lowest_hole(self) -> None:
        """Merge the two lowest ranges (the integers between them join the set)."""
        if len(self._starts) >= 2:
            self.add(self._ends[0] + 1, self._starts[1] - 1)

    def count(self) -> int:
        return sum(e - s + 1 for s, e in zip(self._starts, self._ends, strict=True))

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.ranges())

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntervalSet) and self.ranges() == other.ranges()

    def __repr__(self) -> str:
        return f"IntervalSet({self.ranges()!r})"


# -- dedup marks and their checkpoint ----------------------------------------------------


class NodeMarks:
    """Which node sequence numbers of each ingest node are already in the log."""

    def __init__(self, max_ranges: int = 256) -> None:
        if max_ranges < 1:
            raise ValueError("max_ranges must be >= 1")
        self.max_ranges = max_ranges
        self._nodes: dict[str, IntervalSet] = {}

    def get(self, node: str) -> IntervalSet:
        """The stored ranges of ``node`` (an empty set for an unknown node; do not mutate)."""
        return self._nodes.get(node) or IntervalSet()

    def high_water(self, node: str) -> int:
        marks = self._nodes.get(node)
        return marks.highest() if marks else 0

    def add(self, node: str, first: int, last: int) -> None:
        marks = self._nodes.get(node)
        if marks is None:
            marks = self._nodes[node] = IntervalSet()
        marks.add(first, last)
        while len(marks) > self.max_ranges:
            marks.close_lowest_hole()

    def replace(self, node: str, marks: IntervalSet) -> None:
        while len(marks) > self.max_ranges:
            marks.close_lowest_hole()
        self._nodes[node] = marks

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def to_dict(self) -> dict[str, list[list[int]]]:
        return {node: [[a, b] for a, b in marks] for node, marks in self._nodes.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[Sequence[int]]], max_ranges: int = 256
                  ) -> NodeMarks:
        marks = cls(max_ranges)
        for node, ranges in data.items():
            for first, last in ranges:
                marks.add(node, first, last)
        return marks

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeMarks) and self.to_dict() == other.to_dict()


class CheckpointError(ValueError):
    """A marks checkpoint file that is damaged or not a checkpoint."""


class MarksCheckpoint(NamedTuple):
    log_seq: int  # the marks cover every log record with seq <= log_seq
    marks: NodeMarks


_CKPT_MAGIC = b"IOTPMRK1"
_CKPT_HEADER = struct.Struct("<8sII")  # magic, crc32c of body, body length


def encode_checkpoint(log_seq: int, marks: NodeMarks) -> bytes:
    body = msgpack.packb({"log_seq": log_seq, "nodes": marks.to_dict()}, use_bin_type=True)
    return _CKPT_HEADER.pack(_CKPT_MAGIC, google_crc32c.value(body), len(body)) + body


def decode_checkpoint(data: bytes, max_ranges: int = 256) -> MarksCheckpoint:
    if len(data) < _CKPT_HEADER.size:
        raise CheckpointError("checkpoint: shorter than its header")
    magic, crc, length = _CKPT_HEADER.unpack_from(data)
    if magic != _CKPT_MAGIC:
        raise CheckpointError("checkpoint: bad magic (not a marks checkpoint)")
    body = data[_CKPT_HEADER.size:]
    if len(body) != length:
        raise CheckpointError(f"checkpoint: body is {len(body)} bytes, header says {length}")
    if google_crc32c.value(body) != crc:
        raise CheckpointError("checkpoint: checksum mismatch")
    try:
        obj = msgpack.unpackb(body, raw=False)
        log_seq = obj["log_seq"]
        nodes = obj["nodes"]
        if not isinstance(log_seq, int) or not isinstance(nodes, dict):
            raise TypeError("bad field types")
        return MarksCheckpoint(log_seq, NodeMarks.from_dict(nodes, max_ranges))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint: bad content ({exc})") from None


# -- intake: batches from ingest nodes -> one group commit -------------------------------


class Reply(NamedTuple):
    peer: bytes  # ZeroMQ routing id
    frames: list[bytes]


@dataclass
class PlannedBatch:
    peer: bytes
    batch: wire.Batch
    new: list[tuple[int, int]]  # node seq ranges of this batch that get stored
    stored_before: bool  # every reading was already durable before this plan
    skipped_ahead: bool  # started above the node's high-water mark + 1 (a hole opens)


@dataclass
class IntakePlan:
    batches: list[PlannedBatch] = field(default_factory=list)
    records: list[bytes] = field(default_factory=list)  # encoded log records to append
    readings: list[bytes] = field(default_factory=list)  # the reading inside each record
    provisional: dict[str, IntervalSet] = field(default_factory=dict)

    @property
    def duplicates(self) -> int:
        return sum(len(b.batch.readings) for b in self.batches) - len(self.records)


@dataclass
class IntakeCounters:
    batches: int = 0
    records: int = 0
    duplicates: int = 0
    busy: int = 0
    skipped_ahead: int = 0  # batches that started above a node's high-water mark + 1


class Intake:
    """Plans a group commit for batches that arrived together and answers them."""

    def __init__(self, marks: NodeMarks) -> None:
        self.marks = marks
        self.counters = IntakeCounters()

    def plan(self, arrivals: Sequence[tuple[bytes, wire.Batch]]) -> IntakePlan:
        """The records to append for ``arrivals`` (in order); marks change only on commit."""
        plan = IntakePlan()
        encode = wire.encode_log_record
        for peer, batch in arrivals:
            node, first, last = batch.node, batch.first, batch.last
            marks = plan.provisional.get(node)
            if marks is None:
                marks = plan.provisional[node] = self.marks.get(node).copy()
            stored_before = self.marks.get(node).covers(first, last)
            skipped_ahead = bool(marks) and first > marks.highest() + 1
            new = marks.uncovered(first, last)
            for a, b in new:
                marks.add(a, b)
                readings = batch.readings[a - first:b - first + 1]
                plan.readings.extend(readings)
                plan.records.extend(encode(node, seq, r) for seq, r in enumerate(readings, a))
            plan.batches.append(PlannedBatch(peer, batch, new, stored_before, skipped_ahead))
        return plan

    def committed(self, plan: IntakePlan) -> list[Reply]:
        """The plan's records are durable: adopt its marks and acknowledge every batch."""
        for node, marks in plan.provisional.items():
            self.marks.replace(node, marks)
        self.counters.batches += len(plan.batches)
        self.counters.records += len(plan.records)
        self.counters.duplicates += plan.duplicates
        self.counters.skipped_ahead += sum(pb.skipped_ahead for pb in plan.batches)
        return [Reply(pb.peer, wire.encode_ack(pb.batch.node, pb.batch.last))
                for pb in plan.batches]

    def refused(self, plan: IntakePlan, retry_ms: int, reason: str) -> list[Reply]:
        """Nothing of the plan was stored: ``busy`` for every batch that needed storing.

        A batch that was entirely durable before this plan is still acknowledged.
        """
        replies: list[Reply] = []
        for pb in plan.batches:
            if pb.stored_before:
                self.counters.duplicates += len(pb.batch.readings)
                replies.append(Reply(pb.peer, wire.encode_ack(pb.batch.node, pb.batch.last)))
            else:
                self.counters.busy += 1
                replies.append(Reply(pb.peer, wire.encode_busy(
                    pb.batch.node, pb.batch.first, retry_ms, reason)))
        return replies


def reading_topic(reading: bytes) -> bytes | None:
    """The device id of an encoded reading as raw UTF-8 bytes (the PUB topic), cheaply.

    A reading is a msgpack array of 5 whose first item is the device id string, so it
    starts with 0x95 and a str header; the id is sliced out without decoding the rest.
    None when the bytes do not start like a reading.
    """
    if len(reading) < 2 or reading[0] != 0x95:
        return None
    head = reading[1]
    if 0xA0 <= head <= 0xBF:  # fixstr
        start, length = 2, head & 0x1F
    elif head == 0xD9 and len(reading) >= 3:  # str 8
        start, length = 3, reading[2]
    elif head == 0xDA and len(reading) >= 4:  # str 16
        start, length = 4, int.from_bytes(reading[2:4], "big")
    elif head == 0xDB and len(reading) >= 6:  # str 32
        start, length = 6, int.from_bytes(reading[2:6], "big")
    else:
        return None
    end = start + length
    return reading[start:end] if end <= len(reading) else None


# -- recently appended records -----------------------------------------------------------


class RecentRecords:
    """The most recently appended log records, kept in memory for feed deliveries.

    A consumer that keeps up reads what was just appended; serving it from here saves a
    read and a re-parse of the log file. Older ranges come from the log itself.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._base = 0  # seq of self._records[0]
        self._records: list[bytes] = []
        # Running byte total after each record, counted from the last reset, so a byte
        # limit becomes one bisect instead of a loop over records.
        self._cum: list[int] = []
        self._cum_before = 0  # running total before self._records[0]

    def extend(self, first_seq: int, records: Sequence[bytes]) -> None:
        if first_seq != self._base + len(self._records):  # not contiguous: start over
            self._base, self._records, self._cum, self._cum_before = first_seq, [], [], 0
        total = self._cum[-1] if self._cum else self._cum_before
        self._records.extend(records)
        cum = self._cum
        for record in records:
            total += len(record)
            cum.append(total)
        if total - self._cum_before > self.max_bytes:
            # Drop the oldest down to half the budget, so trimming is amortised.
            drop = bisect_right(cum, total - self.max_bytes // 2)
            if drop:
                self._cum_before = cum[drop - 1]
                del self._records[:drop]
                del cum[:drop]
                self._base += drop

    def get(self, first: int, max_records: int, max_bytes: int) -> list[bytes] | None:
        """Records from ``first`` on (at least one), or None when ``first`` is not held."""
        start = first - self._base
        if start < 0 or start >= len(self._records):
            return None
        before = self._cum[start - 1] if start else self._cum_before
        stop = min(len(self._records), start + max_records)
        end = max(start + 1, bisect_right(self._cum, before + max_bytes, start, stop))
        return self._records[start:end]


# -- the durable feed --------------------------------------------------------------------


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
