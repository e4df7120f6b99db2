"""Sans-I/O state of one durable-feed client (one per middle feed endpoint).

Protocol (see ``iotpipe.wire``): the consumer sends ``iotpipe.feed.v1`` requests carrying
its group, its consumer id, its credit and the log ranges it has stored; the middle answers
with ``iotpipe.records.v1`` deliveries of at most that many records.

Credit is a *window*: the number of delivered-but-unacknowledged records the consumer is
willing to hold (the middle subtracts what it has outstanding to this consumer). Every
request restates it (an absolute value, not an increment), so a heartbeat never over-grants
and a middle that restarted, or lost a request, learns it again from the next heartbeat.
A delivery that races an ack may briefly leave more records in hand than the window; the
consumer takes it anyway (never refuse data). The final request before shutdown carries
credit 0, so the middle sends nothing more.

Acknowledgements are sent only for ranges the caller reports stored with ``stored()``,
which the server calls after every sink write returned. Adjacent ranges are merged.
Nothing here touches a socket or a clock: the caller passes ``now`` (monotonic seconds).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from iotpipe import wire

__all__ = ["FeedConsumer", "WriteBackoff", "listed_twice", "merge_ranges"]


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping or adjacent ``[first, last]`` ranges merged."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


@dataclass
class FeedConsumer:
    group: str
    consumer_id: str
    window: int = 1000  # delivered-but-unacknowledged records the middle may leave with us
    heartbeat_s: float = 1.0  # restate credit at least this often
    middle: str = ""  # the middle's id, learned from its deliveries
    in_hand: int = 0
    last_acked: int = 0  # highest log seq acknowledged (for lag and logs)
    deliveries: int = 0
    ignored: int = 0  # deliveries for another group, empty ones, or malformed frames
    _pending_acks: list[tuple[int, int]] = field(default_factory=list)
    _next_request: float = 0.0  # 0: send the first request at once

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"feed window must be >= 1, got {self.window}")
        if self.heartbeat_s <= 0:
            raise ValueError(f"feed heartbeat must be > 0 seconds, got {self.heartbeat_s}")

    @property
    def credit(self) -> int:
        return self.window

    @property
    def pending_acks(self) -> list[tuple[int, int]]:
        return list(self._pending_acks)

    def request_due(self, now: float) -> bool:
        """A request should go out now: acks are waiting, or the heartbeat is due."""
        return bool(self._pending_acks) or now >= self._next_request

    def seconds_until_due(self, now: float) -> float:
        return 0.0 if self._pending_acks else max(0.0, self._next_request - now)

    def make_request(self, now: float) -> list[bytes]:
        """The frames of the next request; the pending acks are considered sent."""
        acks = merge_ranges(self._pending_acks)
        self._pending_acks.clear()
        self._next_request = now + self.heartbeat_s
        return wire.encode_feed_request(self.group, self.consumer_id, self.credit, acks)

    def final_request(self) -> list[bytes]:
        """The last request before shutdown: the pending acks with credit 0 (send no more)."""
        acks = merge_ranges(self._pending_acks)
        self._pending_acks.clear()
        return wire.encode_feed_request(self.group, self.consumer_id, 0, acks)

    def on_frames(self, frames: Sequence[bytes]) -> wire.Records | None:
        """Take a message from the middle; a delivery to process, or None (ignored).

        Raises ``wire.WireError`` for malformed frames (counted in ``ignored``).
        """
        try:
            records = wire.decode_records(frames)
        except wire.WireError:
            self.ignored += 1
            raise
        if records.group != self.group or not records.records:
            self.ignored += 1
            return None
        if records.first < 1:
            self.ignored += 1
            raise wire.WireError(f"records: 'first' must be >= 1, got {records.first}")
        self.middle = records.middle
        self.in_hand += len(records.records)
        self.deliveries += 1
        return records

    def stored(self, delivery: wire.Records) -> None:
        """Every sink holds ``delivery`` durably: acknowledge it with the next request."""
        self.in_hand = max(0, self.in_hand - len(delivery.records))
        self._pending_acks.append((delivery.first, delivery.last))
        self.last_acked = max(self.last_acked, delivery.last)

    def abandon(self, delivery: wire.Records) -> None:
        """Give a delivery up without acking it (shutdown while sinks fail); it is redelivered."""
        self.in_hand = max(0, self.in_hand - len(delivery.records))


class WriteBackoff:
    """Seconds to wait before each retry of a failing store-of-record write.

    Doubles from ``first`` up to ``cap``: a store that is briefly locked is retried at once,
    one that is down is not hammered. ``reset()`` after a write that succeeded.
    """

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def next_delay(self) -> float:
        delay = self._next
        self._next = min(self._next * 2, self._cap)
        return delay

    def reset(self) -> None:
        self._next = self._first


def listed_twice(cursor_keys: Sequence[str]) -> list[str]:
    """Sink cursor keys that occur more than once, sorted.

    Two writers on one cursor would each skip what the other wrote, so such a sink list is
    refused at start.
    """
    return sorted({key for key in cursor_keys if cursor_keys.count(key) > 1})
