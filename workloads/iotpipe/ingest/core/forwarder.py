"""The forwarder's protocol core, sans-I/O: windowed batches to the middle tier.

The I/O shell reads records from the ingest queue, hands them to ``ForwarderCore.add``,
sends the frames it gets back on the DEALER socket of the endpoint named, passes every
reply to ``on_reply``, calls ``poll`` when ``next_deadline`` passes, and acks its queue up
to whatever ``on_reply`` returns.

Rules (the middle deduplicates by a per-node high-water mark, which is only safe if it
sees a node's seqs in order):

- The node sticks to one endpoint, chosen by rendezvous hashing of (node, endpoint) over
  the endpoint names (a stable hash, not Python's): when the set of endpoints changes,
  only the nodes whose endpoint went away or who now score highest on a new one move.
- ``set_endpoints`` takes a new endpoint list (a reloaded endpoints file). A node that
  moves resends ALL unacked batches from the lowest, in order, to its new endpoint, like a
  failover; the middle tier deduplicates per node, storage per (device, message id).
- Up to ``window`` batches are in flight. A reply ``ack {"last": L}`` acknowledges the
  in-flight batch ending at ``L``; the queue is acked only over the contiguous acked prefix.
- If the oldest unacked batch waits longer than ``ack_timeout`` (no ack, no busy), the
  node fails over to the next endpoint and resends ALL unacked batches from the lowest, in
  order. A late ack from the old endpoint is still honoured: that middle did store it.
- ``busy {"first": F, "retry_ms": R}``: the node stops sending, waits R ms, then resends
  every unacked batch from F on the same endpoint, in order (go-back-N).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from iotpipe.wire import KIND_ACK, KIND_BUSY, WireError, decode_ack, decode_busy, encode_batch

__all__ = ["ForwarderCore", "ForwarderStats", "InFlight", "Send", "preferred_endpoint"]


def _score(node: str, endpoint: str) -> bytes:
    return hashlib.blake2b(f"{node}\0{endpoint}".encode(), digest_size=8).digest()


def preferred_endpoint(node: str, endpoints: Sequence[str]) -> int:
    """The index of the endpoint a node sticks to (rendezvous hashing: the highest score of
    (node, endpoint) wins), the same in every process and run and independent of order."""
    if not endpoints:
        raise ValueError("at least one middle endpoint is needed")
    return max(range(len(endpoints)), key=lambda i: (_score(node, endpoints[i]), endpoints[i]))


@dataclass
class InFlight:
    first: int
    payloads: list[bytes]
    endpoint: int
    sent_at: float
    acked: bool = False

    @property
    def last(self) -> int:
        return self.first + len(self.payloads) - 1


@dataclass(frozen=True)
class Send:
    endpoint: int
    frames: list[bytes]


@dataclass
class ForwarderStats:
    batches_sent: int = 0
    batches_resent: int = 0
    records_acked: int = 0
    failovers: int = 0
    moves: int = 0  # endpoint changes caused by a new endpoint list
    busy_replies: int = 0
    bad_replies: int = 0
    stale_replies: int = 0
    per_endpoint_sent: list[int] = field(default_factory=list)


class ForwarderCore:
    def __init__(
        self,
        node: str,
        endpoints: Sequence[str],
        *,
        next_seq: int,
        window: int = 8,
        ack_timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one middle endpoint is needed")
        if len(set(endpoints)) != len(endpoints):
            raise ValueError("duplicate middle endpoints")
        if window < 1:
            raise ValueError("window must be >= 1")
        self.node = node
        self.endpoints = list(endpoints)
        self.endpoint = preferred_endpoint(node, self.endpoints)
        self.window = window
        self.ack_timeout = ack_timeout
        self.next_seq = next_seq           # next queue seq to read and send
        self.acked_through = next_seq - 1  # every seq <= this is acked by a middle
        self.inflight: list[InFlight] = []
        self.paused_until = 0.0
        self._resend_from: int | None = None  # after busy: resend from here when unpaused
        self.stats = ForwarderStats(per_endpoint_sent=[0] * len(self.endpoints))

    @property
    def n_endpoints(self) -> int:
        return len(self.endpoints)

    def set_endpoints(self, endpoints: Sequence[str], now: float) -> list[Send]:
        """Take a new endpoint list; returns the resends if this node moved to another one.

        Indices change with the list: in-flight batches are renumbered (``-1`` for a batch
        whose endpoint is gone; it is resent, since the node then moves). The caller must
        renumber its sockets the same way (index ``i`` is ``endpoints[i]``).
        """
        new = list(endpoints)
        if not new:
            raise ValueError("at least one middle endpoint is needed")
        if len(set(new)) != len(new):
            raise ValueError("duplicate middle endpoints")
        position = {name: i for i, name in enumerate(new)}
        remap = [position.get(name, -1) for name in self.endpoints]
        current = remap[self.endpoint]
        sent = dict(zip(self.endpoints, self.stats.per_endpoint_sent, strict=True))
        self.stats.per_endpoint_sent = [sent.get(name, 0) for name in new]
        for batch in self.inflight:
            batch.endpoint = remap[batch.endpoint] if batch.endpoint >= 0 else -1
        self.endpoints = new
        self.endpoint = preferred_endpoint(self.node, new)
        if self.endpoint == current:
            # Unacked batches all live on the current endpoint (a failover moves them all),
            # so none should be stranded; if one is, resend from it, in order.
            stranded = [b.first for b in self.inflight if not b.acked and b.endpoint < 0]
            return self._resend(min(stranded), now) if stranded else []
        # Moved (the old endpoint is gone, or a new one scores higher): like a failover,
        # every unacked batch goes to the new endpoint in order, so it sees seqs in order.
        self.stats.moves += 1
        self._resend_from = None
        self.paused_until = 0.0
        return self._resend(self._next_unacked_first(), now)

    # -- capacity --------------------------------------------------------------------

    def can_send(self, now: float) -> bool:
        return len(self.inflight) < self.window and now >= self.paused_until \
            and self._resend_from is None

    @property
    def in_flight_records(self) -> int:
        return sum(len(b.payloads) for b in self.inflight if not b.acked)

    def idle(self) -> bool:
        return not self.inflight

    # -- inputs ----------------------------------------------------------------------

    def add(self, first: int, payloads: Sequence[bytes], now: float) -> Send:
        """Register a new batch read from the queue (seqs ``first``..) and send it."""
        if first != self.next_seq:
            raise ValueError(f"batch starts at {first}, expected {self.next_seq}")
        if not payloads:
            raise ValueError("empty batch")
        batch = InFlight(first, list(payloads), self.endpoint, now)
        self.inflight.append(batch)
        self.next_seq = batch.last + 1
        self.stats.batches_sent += 1
        self.stats.per_endpoint_sent[self.endpoint] += 1
        return Send(self.endpoint, encode_batch(self.node, first, batch.payloads))

    def on_reply(self, endpoint: int, frames: Sequence[bytes], now: float) -> int | None:
        """Handle a reply; returns the new ``acked_through`` if it advanced, else None."""
        kind = bytes(frames[0]) if frames else b""
        try:
            if kind == KIND_ACK:
                ack = decode_ack(frames)
                if ack.node != self.node:
                    raise WireError(f"ack for node {ack.node!r}")
                return self._on_ack(ack.last)
            if kind == KIND_BUSY:
                busy = decode_busy(frames)
                if busy.node != self.node:
                    raise WireError(f"busy for node {busy.node!r}")
                self._on_busy(endpoint, busy.first, busy.retry_ms, now)
                return None
            raise WireError(f"unknown reply kind {kind!r}")
        except WireError:
            self.stats.bad_replies += 1
            return None

    def _on_ack(self, last: int) -> int | None:
        for batch in self.inflight:
            if batch.last == last:
                batch.acked = True
                break
        else:
            self.stats.stale_replies += 1  # a duplicate ack after a resend
            return None
        advanced = False
        while self.inflight and self.inflight[0].acked:
            done = self.inflight.pop(0)
            self.acked_through = done.last
            self.stats.records_acked += len(done.payloads)
            advanced = True
        if self._resend_from is not None and self._resend_from <= self.acked_through:
            self._resend_from = self._next_unacked_first()
        return self.acked_through if advanced else None

    def _next_unacked_first(self) -> int | None:
        for batch in self.inflight:
            if not batch.acked:
                return batch.first
        return None

    def _on_busy(self, endpoint: int, first: int, retry_ms: int, now: float) -> None:
        if endpoint != self.endpoint or not any(b.first == first and not b.acked
                                                for b in self.inflight):
            self.stats.stale_replies += 1
            return
        self.stats.busy_replies += 1
        self.paused_until = max(self.paused_until, now + max(retry_ms, 1) / 1000)
        if self._resend_from is None or first < self._resend_from:
            self._resend_from = first

    def poll(self, now: float) -> list[Send]:
        """Timers: resend after busy, fail over on ack timeout. Returns frames to send."""
        if self.inflight and not self.inflight[0].acked \
                and now - self._oldest_unacked_sent_at() >= self.ack_timeout:
            self.stats.failovers += 1
            self.endpoint = (self.endpoint + 1) % len(self.endpoints)
            self._resend_from = None
            self.paused_until = 0.0
            return self._resend(self._next_unacked_first(), now)
        if self._resend_from is not None and now >= self.paused_until:
            start = self._resend_from
            self._resend_from = None
            return self._resend(start, now)
        return []

    def _oldest_unacked_sent_at(self) -> float:
        return min(b.sent_at for b in self.inflight if not b.acked)

    def _resend(self, start: int | None, now: float) -> list[Send]:
        sends = []
        if start is None:
            return sends
        for batch in self.inflight:
            if batch.acked or batch.last < start:
                continue
            batch.endpoint = self.endpoint
            batch.sent_at = now
            self.stats.batches_resent += 1
            self.stats.per_endpoint_sent[self.endpoint] += 1
            sends.append(Send(self.endpoint, encode_batch(self.node, batch.first,
                                                          batch.payloads)))
        return sends

    def next_deadline(self) -> float | None:
        """When ``poll`` next has something to do (None: nothing pending)."""
        deadlines = []
        if self.inflight and any(not b.acked for b in self.inflight):
            deadlines.append(self._oldest_unacked_sent_at() + self.ack_timeout)
        if self._resend_from is not None:
            deadlines.append(self.paused_until)
        return min(deadlines) if deadlines else None
