"""Sans-I/O core of the relay: client subscriptions, fan-out, bounded queues and gaps.

Nothing here touches a socket or a clock: the I/O shell (``server.py``) feeds decoded live
events and client text frames in, passes the current time where it matters, and sends the
frames this module hands back. docs/protocols.md, "Client-app protocol", is the
client-facing description of the same rules; keep the two in step.

Fan-out rules
    * Each upstream live event is turned into one JSON ``reading`` frame, built once and
      shared by every matching client. The device's ``data`` JSON is spliced in as bytes.
      With a ``framing`` function (the shell's WebSocket text framing), every frame is
      queued in its wire form, framed once per event for all clients, not once per client.
    * Each client has a bounded queue of frames waiting to be sent. When it is full, new
      matching events are dropped for that client only and counted; as soon as there is room
      again (or the queue has drained), one ``gap`` frame with ``reason: "slow_client"`` and
      the number missed takes the place of the dropped events, so the client sees exactly
      where it lost data. Other clients are never delayed.
    * A client whose queue has frames waiting and whose sender made no progress for the
      stall timeout is reported by :meth:`Fanout.stalled`; the shell closes it with
      :data:`CLOSE_SLOW_CONSUMER`.
    * Upstream sequence numbers are per middle (``source``). A jump forward means the relay
      missed events on the PUB/SUB hop (lossy by design); every subscribed client is told
      with a ``gap`` frame, ``reason: "upstream"``, naming the source and the missing range
      (the relay cannot know which of those would have matched the client's filter). A
      sequence number at or below the last one seen is a duplicate and is dropped, except
      ``1``, which means the source's log started afresh (``reset`` frame to every client).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

import orjson

from iotpipe.relay.admission import LIVE_PATH, Admitted, Refused, admit
from iotpipe.relay.subscriptions import (
    FILTER_FIELDS,
    Filters,
    ProtocolError,
    Subscription,
    error_frame,
    parse_client_frame,
)
from iotpipe.wire import LiveEvent, Reading, WireError, decode_reading

__all__ = [
    "CLOSE_SLOW_CONSUMER",
    "FILTER_FIELDS",
    "LIVE_PATH",
    "UNKNOWN",
    "Admitted",
    "ClientSession",
    "Fanout",
    "FanoutStats",
    "Lookup",
    "ProtocolError",
    "Refused",
    "SourceTracker",
    "SourceVerdict",
    "Subscription",
    "admit",
    "encode_reading_frame",
    "parse_client_frame",
]

# Close code for a client that stopped reading (docs/protocols.md, "Client-app protocol").
CLOSE_SLOW_CONSUMER = 4008

# Class/location given to devices the registry does not know (same rule as storage).
UNKNOWN = "unknown"

# Lookup(device_id) -> (device_class, location); the shell binds it to the live registry.
Lookup = Callable[[str], tuple[str, str]]


# -- event frames ------------------------------------------------------------------------


_READING_FRAME = (b'{"event":"reading","device":%b,"id":%b,"ts":%d,"received":%d,'
                  b'"data":%b,"seq":%d,"source":%b}')


def _json_str(value: str) -> bytes:
    return orjson.dumps(value)


def encode_reading_frame(reading: Reading, seq: int, source: str) -> bytes:
    """The ``reading`` event, with the device's ``data`` JSON spliced in unchanged."""
    # One bytes %-format: about a third cheaper per event than joining encoded pieces.
    return _READING_FRAME % (_json_str(reading.device_id), _json_str(reading.msg_id),
                             reading.ts_ns, reading.received_ns, reading.data_json, seq,
                             _json_str(source))


def slow_gap_frame(missed: int) -> bytes:
    return orjson.dumps({"event": "gap", "reason": "slow_client", "missed": missed})


def upstream_gap_frame(source: str, first: int, last: int) -> bytes:
    return orjson.dumps({"event": "gap", "reason": "upstream", "source": source,
                         "missed": last - first + 1, "from_seq": first, "to_seq": last})


def reset_frame(source: str, last_seq: int) -> bytes:
    return orjson.dumps({"event": "reset", "source": source, "last_seq": last_seq})


# -- per-source sequence tracking --------------------------------------------------------


class SourceVerdict(Enum):
    FIRST = "first"  # first event seen from this source: nothing to compare with
    NEXT = "next"  # the expected next sequence number
    GAP = "gap"  # a jump forward: events were missed upstream
    DUPLICATE = "duplicate"  # at or below the last seen: drop
    RESET = "reset"  # the source started again at 1


class SourceTracker:
    """Last sequence number seen per middle (``source``)."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    def observe(self, source: str, seq: int) -> tuple[SourceVerdict, int]:
        """Classify ``seq``; the int is the previous last seq (0 when there was none)."""
        previous = self.last.get(source)
        if previous is None:
            self.last[source] = seq
            return SourceVerdict.FIRST, 0
        if seq == previous + 1:
            self.last[source] = seq
            return SourceVerdict.NEXT, previous
        if seq > previous:
            self.last[source] = seq
            return SourceVerdict.GAP, previous
        if seq == 1:
            self.last[source] = seq
            return SourceVerdict.RESET, previous
        return SourceVerdict.DUPLICATE, previous


# -- per-client session ------------------------------------------------------------------


class ClientSession:
    """One client's subscription and bounded send queue.

    The shell calls :meth:`take` from the client's sender task and sends what it returns, in
    order; :meth:`receive` for each text frame from the client.
    """

    def __init__(self, client_id: str, queue_limit: int = 1000, max_filters: int = 1000) -> None:
        if queue_limit < 1:
            raise ValueError("queue_limit must be >= 1")
        self.client_id = client_id
        self.queue_limit = queue_limit
        self.max_filters = max_filters
        self.subscription = Subscription()
        self._queue: deque[bytes] = deque()
        self._missed = 0  # dropped since the last gap frame was queued
        self.missed_total = 0
        self.sent_total = 0
        self._last_progress = 0.0
        self.closed = False
        # The wire form of queued frames (set by the Fanout that holds this session): the
        # session applies it to the frames it makes itself (gap notices, replies).
        self.framing: Callable[[bytes], bytes] | None = None
        # Set by the Fanout that holds this session, to keep its routing index current:
        # called with (session, filters before, filters after) after every change.
        self.on_change: Callable[[ClientSession, Filters, Filters], None] | None = None

    # client -> relay
    def receive(self, text: str | bytes) -> bytes:
        """Apply one client frame; returns the reply frame (confirmation or error)."""
        try:
            request = parse_client_frame(text, max_items=self.max_filters)
        except ProtocolError as exc:
            return error_frame(exc.reason, exc.detail)
        before = self.subscription.filters()
        self.subscription.apply(request)
        if self.subscription.size() > self.max_filters:
            # Roll back: a client may not grow its filter without bound.
            self.subscription = Subscription(*(set(before[name]) for name in FILTER_FIELDS))
            return error_frame("too_many_filters",
                               f"subscription would exceed {self.max_filters} entries", request.op)
        if self.on_change is not None:
            self.on_change(self, before, self.subscription.filters())
        return orjson.dumps({"event": "subscribed" if request.op == "subscribe"
                             else "unsubscribed", **self.subscription.describe()})

    def answer(self, text: str | bytes, now: float) -> None:
        """Apply one client frame and queue the reply in order with the events."""
        self.notify(self.wire(self.receive(text)), now)

    def wire(self, frame: bytes) -> bytes:
        """``frame`` in the form this session queues (see ``framing``)."""
        framing = self.framing
        return frame if framing is None else framing(frame)

    # relay -> client
    @property
    def pending(self) -> int:
        """Frames waiting to be sent (a pending gap notice counts as one)."""
        return len(self._queue) + (1 if self._missed else 0)

    def offer(self, frame: bytes, now: float) -> bool:
        """Queue ``frame`` unless the queue is full; returns False when it was dropped."""
        # Called once per client per event: plain attribute reads, no property calls.
        queue = self._queue
        missed = self._missed
        if not queue and not missed:
            self._last_progress = now  # the stall clock starts when work appears
        if missed:
            if len(queue) + 1 >= self.queue_limit:
                # No room for the gap notice and the event: keep dropping, in order.
                self._missed = missed + 1
                self.missed_total += 1
                return False
            queue.append(self.wire(slow_gap_frame(missed)))
            self._missed = 0
        elif len(queue) >= self.queue_limit:
            self._missed = 1
            self.missed_total += 1
            return False
        queue.append(frame)
        return True

    def offer_many(self, frames: list[bytes], now: float) -> int:
        """:meth:`offer` each of ``frames`` in order; returns how many were queued."""
        queue = self._queue
        if not self._missed and len(queue) + len(frames) <= self.queue_limit:
            # Room for all and no gap owed: what offer() would do, frame by frame.
            if not queue and frames:
                self._last_progress = now
            queue.extend(frames)
            return len(frames)
        queued = 0
        for frame in frames:
            if self.offer(frame, now):
                queued += 1
        return queued

    def notify(self, frame: bytes, now: float) -> None:
        """Queue a control frame (upstream gap, reset) that must not be dropped silently.

        Control frames may exceed the queue limit by a small amount; they are rare (one
        per upstream incident) so this cannot grow without bound in practice, and a client
        that stops reading is closed by the stall rule anyway.
        """
        if self.pending == 0:
            self._last_progress = now
        if self._missed:
            self._queue.append(self.wire(slow_gap_frame(self._missed)))
            self._missed = 0
        self._queue.append(frame)

    def take(self, now: float, max_frames: int = 64) -> list[bytes]:
        """Frames to send now, oldest first; calling it marks sender progress."""
        self._last_progress = now
        queue = self._queue
        if len(queue) <= max_frames:
            out = list(queue)
            queue.clear()
        else:
            out = [queue.popleft() for _ in range(max_frames)]
        if not queue and self._missed and len(out) < max_frames:
            out.append(self.wire(slow_gap_frame(self._missed)))
            self._missed = 0
        self.sent_total += len(out)
        return out

    def mark_progress(self, now: float) -> None:
        """Restart the stall clock (the connection just opened)."""
        self._last_progress = now

    def stalled(self, now: float, stall_s: float) -> bool:
        return self.pending > 0 and now - self._last_progress >= stall_s


# -- fan-out -----------------------------------------------------------------------------


@dataclass
class FanoutStats:
    events_in: int = 0
    events_matched: int = 0  # events that matched at least one client
    frames_queued: int = 0  # reading frames queued to clients (sum over clients)
    dropped: int = 0  # reading frames dropped for slow clients
    upstream_gaps: int = 0
    upstream_missed: int = 0
    duplicates: int = 0
    resets: int = 0
    bad_events: int = 0


class _RoutingIndex:
    """Which sessions want which devices, so routing one event costs O(matches), not O(clients).

    Exact ids and registry attributes are dict lookups; prefixes are looked up once per
    distinct prefix length. Updated incrementally on every subscription change, so a client
    that churns its subscription costs only its own entries, never a rebuild.
    """

    def __init__(self) -> None:
        self.by_field: dict[str, dict[str, dict[str, ClientSession]]] = {
            name: {} for name in FILTER_FIELDS}
        self._prefix_length_uses: dict[int, int] = {}
        self.prefix_lengths: list[int] = []
        self.subscribed: dict[str, ClientSession] = {}

    def update(self, session: ClientSession, before: Filters, after: Filters) -> None:
        client_id = session.client_id
        lengths_changed = False
        for name in FILTER_FIELDS:
            index = self.by_field[name]
            old, new = before.get(name, set()), after.get(name, set())
            for value in old - new:
                holders = index.get(value)
                if holders is not None and holders.pop(client_id, None) is not None:
                    if not holders:
                        del index[value]
                    if name == "prefixes":
                        lengths_changed |= self._count_length(len(value), -1)
            for value in new - old:
                holders = index.setdefault(value, {})
                if client_id not in holders:
                    holders[client_id] = session
                    if name == "prefixes":
                        lengths_changed |= self._count_length(len(value), +1)
        if lengths_changed:
            self.prefix_lengths = sorted(self._prefix_length_uses)
        if any(after.values()):
            self.subscribed[client_id] = session
        else:
            self.subscribed.pop(client_id, None)

    def _count_length(self, length: int, delta: int) -> bool:
        """Count prefixes per length; True when a length appeared or disappeared."""
        uses = self._prefix_length_uses.get(length, 0) + delta
        if uses:
            self._prefix_length_uses[length] = uses
        else:
            del self._prefix_length_uses[length]
        return uses == 0 or (uses == 1 and delta > 0)

    def match(self, device_id: str, attrs: Callable[[str], tuple[str, str]]
              ) -> list[ClientSession]:
        return list(self.match_group(device_id, attrs).values())

    def match_group(self, device_id: str, attrs: Callable[[str], tuple[str, str]]
                    ) -> dict[str, ClientSession]:
        """The sessions that want ``device_id``, by client id; a live index entry when one
        entry holds them all (the same object for every event it serves), so read only."""
        by_field = self.by_field
        # Index entries that hold the device, each a dict client id -> session.
        groups: list[dict[str, ClientSession]] = []
        holders = by_field["devices"].get(device_id)
        if holders:
            groups.append(holders)
        by_prefix = by_field["prefixes"]
        for length in self.prefix_lengths:
            if length > len(device_id):
                break
            holders = by_prefix.get(device_id[:length])
            if holders:
                groups.append(holders)
        by_class, by_location = by_field["classes"], by_field["locations"]
        if by_class or by_location:
            device_class, location = attrs(device_id)
            holders = by_class.get(device_class)
            if holders:
                groups.append(holders)
            holders = by_location.get(location)
            if holders:
                groups.append(holders)
        if len(groups) == 1:
            return groups[0]  # one entry: no session twice
        # A session matching through several entries gets the event once.
        merged: dict[str, ClientSession] = {}
        for holders in groups:
            merged.update(holders)
        return merged


class Fanout:
    """All client sessions of one relay process and the upstream sequence trackers."""

    def __init__(self, lookup: Lookup | None = None,
                 framing: Callable[[bytes], bytes] | None = None) -> None:
        self.sessions: dict[str, ClientSession] = {}
        self.sources = SourceTracker()
        self.stats = FanoutStats()
        self._lookup = lookup
        self._routing = _RoutingIndex()
        # Applied once per frame that goes to clients (None: frames are queued as JSON).
        self.framing = framing

    def set_lookup(self, lookup: Lookup | None) -> None:
        self._lookup = lookup

    def add(self, session: ClientSession) -> None:
        self.sessions[session.client_id] = session
        session.framing = self.framing
        session.on_change = self._routing.update
        self._routing.update(session, {}, session.subscription.filters())

    def remove(self, client_id: str) -> None:
        session = self.sessions.pop(client_id, None)
        if session is not None:
            session.closed = True
            session.on_change = None
            self._routing.update(session, session.subscription.filters(), {})

    def _attrs(self, device_id: str) -> tuple[str, str]:
        if self._lookup is None:
            return (UNKNOWN, UNKNOWN)
        return self._lookup(device_id)

    def on_event(self, event: LiveEvent, now: float) -> list[ClientSession]:
        """Route one upstream event; returns the sessions that got new frames."""
        return self.on_events((event,), now)

    def on_events(self, events: Iterable[LiveEvent], now: float) -> list[ClientSession]:
        """Route a burst of upstream events in order; the sessions that got new frames.

        Consecutive events that go to the same set of sessions (one routing-index entry,
        e.g. everyone following "all") are handed to each session in one
        :meth:`ClientSession.offer_many`: the per-client cost is paid per run of events,
        not per event. Runs are delivered in event order, so each client's order holds.
        """
        stats = self.stats
        routing = self._routing
        framing = self.framing
        woken: dict[str, ClientSession] = {}  # by client id, in the order first woken
        run_group: dict[str, ClientSession] | None = None
        run: list[bytes] = []
        for event in events:
            stats.events_in += 1
            verdict, previous = self.sources.observe(event.middle_id, event.seq)
            if verdict is SourceVerdict.NEXT or verdict is SourceVerdict.FIRST:
                pass
            elif verdict is SourceVerdict.DUPLICATE:
                stats.duplicates += 1
                continue
            else:
                if verdict is SourceVerdict.GAP:
                    stats.upstream_gaps += 1
                    stats.upstream_missed += event.seq - previous - 1
                    notice = upstream_gap_frame(event.middle_id, previous + 1, event.seq - 1)
                else:
                    stats.resets += 1
                    notice = reset_frame(event.middle_id, previous)
                if framing is not None:
                    notice = framing(notice)
                if run_group is not None:  # frames before the notice go first
                    self._deliver(run_group, run, now, woken)
                    run_group, run = None, []
                # Every subscribed client: the relay cannot know what the missing events were.
                for session in routing.subscribed.values():
                    session.notify(notice, now)
                    woken[session.client_id] = session
            group = routing.match_group(event.device_id, self._attrs)
            if not group:
                continue
            try:
                reading = decode_reading(event.reading)
            except WireError:
                stats.bad_events += 1
                continue
            if reading.device_id != event.device_id:
                stats.bad_events += 1
                continue
            frame = encode_reading_frame(reading, event.seq, event.middle_id)
            if framing is not None:
                frame = framing(frame)
            stats.events_matched += 1
            if group is not run_group:
                if run_group is not None:
                    self._deliver(run_group, run, now, woken)
                run_group, run = group, []
            run.append(frame)
        if run_group is not None:
            self._deliver(run_group, run, now, woken)
        return list(woken.values())

    def _deliver(self, group: dict[str, ClientSession], frames: list[bytes], now: float,
                 woken: dict[str, ClientSession]) -> None:
        stats = self.stats
        queued = 0
        for session in group.values():
            queued += session.offer_many(frames, now)
        stats.frames_queued += queued
        stats.dropped += len(group) * len(frames) - queued
        woken.update(group)  # both by client id: one merge in C, no dict per event

    def stalled(self, now: float, stall_s: float) -> Iterable[ClientSession]:
        return [s for s in self.sessions.values() if s.stalled(now, stall_s)]
