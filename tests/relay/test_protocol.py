"""The relay's sans-I/O core: parsing, matching, bounded queues, gaps, stalls."""

from __future__ import annotations

import itertools

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe.auth import CLIENT_AUDIENCE, DEVICE_AUDIENCE, issue_token
from iotpipe.denylist import DenyList
from iotpipe.relay.core import (
    LIVE_PATH,
    Admitted,
    ClientSession,
    Fanout,
    ProtocolError,
    Refused,
    SourceTracker,
    SourceVerdict,
    admit,
    encode_reading_frame,
    parse_client_frame,
)
from iotpipe.wire import LiveEvent, Reading, encode_reading

pytestmark = pytest.mark.unit


def live(device: str, seq: int, source: str = "m0", data: bytes = b'{"t":21.5}',
         msg_id: str | None = None) -> LiveEvent:
    reading = encode_reading(device, msg_id or f"{device}-{seq}", 1_700_000_000_000_000_000 + seq,
                             data, 1_700_000_000_000_000_500 + seq)
    return LiveEvent(device, source, seq, reading)


def decoded(frames: list[bytes]) -> list[dict[str, object]]:
    return [orjson.loads(f) for f in frames]


def subscribed(session: ClientSession, **filters: list[str]) -> ClientSession:
    reply = orjson.loads(session.receive(orjson.dumps({"op": "subscribe", **filters})))
    assert reply["event"] == "subscribed", reply
    return session


# -- client frames ---------------------------------------------------------------------------


def test_parse_subscribe_all_fields() -> None:
    request = parse_client_frame(b'{"op":"subscribe","devices":["a"],"prefixes":["b-"],'
                                 b'"classes":["c"],"locations":["d"]}')
    assert request.op == "subscribe"
    assert request.devices == {"a"} and request.prefixes == {"b-"}
    assert request.classes == {"c"} and request.locations == {"d"}


@pytest.mark.parametrize(("text", "reason"), [
    ("not json", "bad_json"),
    ("[1,2]", "bad_frame"),
    ('{"op":"publish","devices":["a"]}', "unknown_op"),
    ('{"devices":["a"]}', "unknown_op"),
    ('{"op":"subscribe","devices":"a"}', "bad_field"),
    ('{"op":"subscribe","devices":[1]}', "bad_field"),
    ('{"op":"subscribe","devices":[""]}', "bad_field"),
    ('{"op":"subscribe","device":["a"]}', "bad_field"),
    ('{"op":"subscribe"}', "bad_field"),
])
def test_parse_rejects_bad_frames_with_reason(text: str, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_client_frame(text)
    assert info.value.reason == reason
    assert info.value.detail


def test_parse_limits_entries_and_length() -> None:
    with pytest.raises(ProtocolError, match="too_many_filters"):
        too_many = {"op": "subscribe", "devices": [str(i) for i in range(11)]}
        parse_client_frame(orjson.dumps(too_many), max_items=10)
    with pytest.raises(ProtocolError, match="longer than"):
        parse_client_frame(orjson.dumps({"op": "subscribe", "devices": ["x" * 300]}))


def test_session_subscribe_unsubscribe_replies_with_full_filter() -> None:
    session = ClientSession("c1")
    reply = orjson.loads(session.receive(b'{"op":"subscribe","devices":["a","b"],"classes":["k"]}'))
    assert reply == {"event": "subscribed", "devices": ["a", "b"], "prefixes": [],
                     "classes": ["k"], "locations": [], "all": False}
    reply = orjson.loads(session.receive(b'{"op":"unsubscribe","devices":["a"]}'))
    assert reply == {"event": "unsubscribed", "devices": ["b"], "prefixes": [],
                     "classes": ["k"], "locations": [], "all": False}
    error = orjson.loads(session.receive(b'{"op":"subscribe"'))
    assert error["event"] == "error" and error["reason"] == "bad_json"


def test_session_filter_limit_is_cumulative_and_rolls_back() -> None:
    session = ClientSession("c1", max_filters=3)
    subscribed(session, devices=["a", "b"])
    error = orjson.loads(session.receive(b'{"op":"subscribe","prefixes":["x","y"]}'))
    assert error["reason"] == "too_many_filters" and error["op"] == "subscribe"
    assert session.subscription.describe()["devices"] == ["a", "b"]
    assert session.subscription.prefixes == set()


# -- frames -------------------------------------------------------------------------------


def test_reading_frame_splices_data_and_is_valid_json() -> None:
    reading = Reading('dev"1', "m-1", 123, b'{"x":[1,2],"s":"\\u00e9"}', 456)
    frame = orjson.loads(encode_reading_frame(reading, 7, "middle-0"))
    assert frame == {"event": "reading", "device": 'dev"1', "id": "m-1", "ts": 123,
                     "received": 456, "data": {"x": [1, 2], "s": "\u00e9"}, "seq": 7,
                     "source": "middle-0"}


# -- matching -----------------------------------------------------------------------------


def test_matching_by_id_prefix_class_location() -> None:
    registry = {"boiler-1": ("boiler", "hall-1"), "therm-1": ("thermometer", "hall-2")}
    fanout = Fanout(lambda d: registry.get(d, ("unknown", "unknown")))
    by_id = subscribed(ClientSession("id"), devices=["boiler-1"])
    by_prefix = subscribed(ClientSession("prefix"), prefixes=["therm-"])
    by_class = subscribed(ClientSession("class"), classes=["boiler"])
    by_location = subscribed(ClientSession("loc"), locations=["hall-2"])
    unknown = subscribed(ClientSession("unknown"), classes=["unknown"])
    idle = ClientSession("idle")
    for s in (by_id, by_prefix, by_class, by_location, unknown, idle):
        fanout.add(s)
    for seq, device in enumerate(["boiler-1", "therm-1", "stray-9"], start=1):
        fanout.on_event(live(device, seq), now=0.0)

    def devices(session: ClientSession) -> list[object]:
        return [f["device"] for f in decoded(session.take(0.0))]

    assert devices(by_id) == ["boiler-1"]
    assert devices(by_prefix) == ["therm-1"]
    assert devices(by_class) == ["boiler-1"]
    assert devices(by_location) == ["therm-1"]
    assert devices(unknown) == ["stray-9"]
    assert devices(idle) == []
    assert fanout.stats.events_in == 3


def test_one_event_matching_several_filters_is_sent_once() -> None:
    fanout = Fanout(lambda d: ("boiler", "hall"))
    session = subscribed(ClientSession("c"), devices=["b1"], prefixes=["b"], classes=["boiler"])
    fanout.add(session)
    fanout.on_event(live("b1", 1), 0.0)
    assert len(session.take(0.0)) == 1


def test_subscribe_all_follows_every_device_and_is_undone_explicitly() -> None:
    fanout = Fanout(lambda d: ("k", "l"))
    everything = ClientSession("all")
    fanout.add(everything)
    reply = orjson.loads(everything.receive(b'{"op":"subscribe","all":true}'))
    assert reply == {"event": "subscribed", "devices": [], "prefixes": [], "classes": [],
                     "locations": [], "all": True}
    for seq, device in enumerate(["sim-0", "therm-1", "x"], start=1):
        fanout.on_event(live(device, seq), 0.0)
    assert [f["device"] for f in decoded(everything.take(0.0))] == ["sim-0", "therm-1", "x"]
    # Unsubscribing from everything keeps the other entries (and vice versa).
    everything.receive(b'{"op":"subscribe","devices":["x"]}')
    reply = orjson.loads(everything.receive(b'{"op":"unsubscribe","all":true}'))
    assert reply["all"] is False and reply["devices"] == ["x"]
    fanout.on_event(live("sim-0", 4), 0.0)
    fanout.on_event(live("x", 5), 0.0)
    assert [f["device"] for f in decoded(everything.take(0.0))] == ["x"]


@pytest.mark.parametrize(("frame", "detail"), [
    (b'{"op":"subscribe","prefixes":[""]}', "non-empty"),
    (b'{"op":"subscribe","all":"yes"}', "'all' must be true or false"),
    (b'{"op":"subscribe","all":false}', '"all": true'),
])
def test_subscribe_all_must_be_asked_for_explicitly(frame: bytes, detail: str) -> None:
    error = orjson.loads(ClientSession("c").receive(frame))
    assert error["event"] == "error" and error["reason"] == "bad_field"
    assert detail in error["detail"]


def test_unsubscribed_client_gets_nothing_more() -> None:
    fanout = Fanout()
    session = subscribed(ClientSession("c"), devices=["a"])
    fanout.add(session)
    fanout.on_event(live("a", 1), 0.0)
    session.receive(b'{"op":"unsubscribe","devices":["a"]}')
    fanout.on_event(live("a", 2), 0.0)
    assert [f["seq"] for f in decoded(session.take(0.0))] == [1]


# -- slow clients -------------------------------------------------------------------------


def test_slow_client_gets_gap_in_place_of_dropped_events_and_others_get_all() -> None:
    fanout = Fanout()
    slow = subscribed(ClientSession("slow", queue_limit=5), prefixes=["d"])
    fast = subscribed(ClientSession("fast", queue_limit=5), prefixes=["d"])
    fanout.add(slow)
    fanout.add(fast)
    fast_seen: list[dict[str, object]] = []
    for seq in range(1, 21):
        fanout.on_event(live("d1", seq), 0.0)
        fast_seen += decoded(fast.take(0.0))
    assert [f["seq"] for f in fast_seen] == list(range(1, 21))
    assert slow.pending == 6  # 5 queued frames + the pending gap notice
    frames = decoded(slow.take(0.0, max_frames=100))
    assert [f.get("seq") for f in frames[:5]] == [1, 2, 3, 4, 5]
    assert frames[5] == {"event": "gap", "reason": "slow_client", "missed": 15}
    assert fanout.stats.dropped == 15
    assert slow.missed_total == 15
    # After draining, delivery resumes normally.
    fanout.on_event(live("d1", 21), 0.0)
    assert [f["seq"] for f in decoded(slow.take(0.0))] == [21]


def test_gap_notice_is_placed_before_the_next_delivered_event() -> None:
    session = subscribed(ClientSession("s", queue_limit=3), devices=["d"])
    fanout = Fanout()
    fanout.add(session)
    for seq in range(1, 6):  # 1..3 queued, 4..5 dropped
        fanout.on_event(live("d", seq), 0.0)
    first = decoded(session.take(0.0, max_frames=2))
    assert [f["seq"] for f in first] == [1, 2]
    for seq in range(6, 9):  # room for one gap notice + one event: 6 in, 7..8 dropped
        fanout.on_event(live("d", seq), 0.0)
    rest = decoded(session.take(0.0, max_frames=100))
    assert rest == [
        *decoded([encode_reading_frame(Reading("d", "d-3", 1_700_000_000_000_000_003, b'{"t":21.5}',
                                               1_700_000_000_000_000_503), 3, "m0")]),
        {"event": "gap", "reason": "slow_client", "missed": 2},
        rest[2],
        {"event": "gap", "reason": "slow_client", "missed": 2},
    ]
    assert rest[2]["seq"] == 6
    # Total accounting: every event is either delivered or counted in a gap.
    assert session.missed_total == 4


def test_queue_memory_is_bounded_for_a_client_that_never_reads() -> None:
    session = subscribed(ClientSession("never", queue_limit=10), devices=["d"])
    fanout = Fanout()
    fanout.add(session)
    for seq in range(1, 100_001):
        fanout.on_event(live("d", seq), 0.0)
    assert session.pending == 11
    assert session.missed_total == 100_000 - 10


def test_stall_detection_needs_pending_frames_and_no_progress() -> None:
    session = subscribed(ClientSession("s", queue_limit=10), devices=["d"])
    session.take(0.0)  # the reply frame from subscribed() was not queued here
    fanout = Fanout()
    fanout.add(session)
    assert not session.stalled(100.0, 5.0)  # nothing pending: idle is not stalled
    fanout.on_event(live("d", 1), 100.0)
    assert not session.stalled(104.0, 5.0)
    assert session.stalled(105.0, 5.0)
    assert list(fanout.stalled(105.0, 5.0)) == [session]
    session.take(105.0)
    assert not session.stalled(200.0, 5.0)


# -- upstream sequences -------------------------------------------------------------------


def test_source_tracker_verdicts() -> None:
    tracker = SourceTracker()
    assert tracker.observe("m0", 10)[0] is SourceVerdict.FIRST
    assert tracker.observe("m0", 11)[0] is SourceVerdict.NEXT
    assert tracker.observe("m1", 1)[0] is SourceVerdict.FIRST  # sources are independent
    assert tracker.observe("m0", 15) == (SourceVerdict.GAP, 11)
    assert tracker.observe("m0", 15)[0] is SourceVerdict.DUPLICATE
    assert tracker.observe("m0", 12)[0] is SourceVerdict.DUPLICATE
    assert tracker.observe("m0", 1) == (SourceVerdict.RESET, 15)
    assert tracker.observe("m0", 2)[0] is SourceVerdict.NEXT


def test_upstream_gap_is_reported_to_subscribed_clients_in_order() -> None:
    fanout = Fanout()
    session = subscribed(ClientSession("c"), devices=["other"])
    idle = ClientSession("idle")
    fanout.add(session)
    fanout.add(idle)
    for seq in (1, 2, 6, 6, 7):
        fanout.on_event(live("other" if seq != 2 else "x", seq, source="m0"), 0.0)
    frames = decoded(session.take(0.0))
    assert frames[0]["seq"] == 1
    assert frames[1] == {"event": "gap", "reason": "upstream", "source": "m0", "missed": 3,
                         "from_seq": 3, "to_seq": 5}
    assert [f["seq"] for f in frames[2:]] == [6, 7]  # the duplicate 6 is not delivered twice
    assert idle.take(0.0) == []  # no subscription: no gap noise
    assert fanout.stats.upstream_missed == 3
    assert fanout.stats.duplicates == 1


def test_source_reset_is_announced() -> None:
    fanout = Fanout()
    session = subscribed(ClientSession("c"), devices=["d"])
    fanout.add(session)
    fanout.on_event(live("d", 5), 0.0)
    fanout.on_event(live("d", 1), 0.0)
    frames = decoded(session.take(0.0))
    assert frames[1] == {"event": "reset", "source": "m0", "last_seq": 5}
    assert frames[2]["seq"] == 1


def test_undecodable_reading_is_counted_not_delivered() -> None:
    fanout = Fanout()
    session = subscribed(ClientSession("c"), devices=["d"])
    fanout.add(session)
    fanout.on_event(LiveEvent("d", "m0", 1, b"\xc1garbage"), 0.0)
    fanout.on_event(LiveEvent("d", "m0", 2, encode_reading("e", "x", 1, b"{}", 1)), 0.0)
    assert session.take(0.0) == []
    assert fanout.stats.bad_events == 2


# -- property: nothing is lost silently ---------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(limit=st.integers(1, 8),
       ops=st.lists(st.tuples(st.sampled_from(["offer", "take"]), st.integers(1, 12)),
                    max_size=40))
def test_every_event_is_delivered_in_order_or_counted_where_it_was_dropped(
        limit: int, ops: list[tuple[str, int]]) -> None:
    session = subscribed(ClientSession("p", queue_limit=limit), devices=["d"])
    fanout = Fanout()
    fanout.add(session)
    offered = 0
    delivered: list[dict[str, object]] = []
    for op, n in ops:
        if op == "offer":
            for _ in range(n):
                offered += 1
                fanout.on_event(live("d", offered), 0.0)
        else:
            delivered += decoded(session.take(0.0, max_frames=n))
        assert session.pending <= limit + 1  # bounded, whatever the client does
    delivered += decoded(session.take(0.0, max_frames=10**6))
    assert session.pending == 0
    expected_next = 1
    for frame in delivered:
        if frame["event"] == "gap":
            assert frame["reason"] == "slow_client" and int(frame["missed"]) > 0  # type: ignore[call-overload]
            expected_next += int(frame["missed"])  # type: ignore[call-overload]
        else:
            assert frame["seq"] == expected_next, (frame, delivered)
            expected_next += 1
    assert expected_next == offered + 1
    assert session.missed_total == offered - sum(1 for f in delivered if f["event"] == "reading")


_names = st.sampled_from(["a", "ab", "abc", "b", "ba", "x-1", "x-10", "x-2"])
_filters = st.fixed_dictionaries({}, optional={
    "devices": st.lists(_names, min_size=1, max_size=3),
    "prefixes": st.lists(_names, min_size=1, max_size=3),
    "classes": st.lists(st.sampled_from(["k1", "k2", "unknown"]), min_size=1, max_size=2),
    "locations": st.lists(st.sampled_from(["l1", "l2", "unknown"]), min_size=1, max_size=2),
    "all": st.booleans(),
})
_steps = st.one_of(
    st.tuples(st.just("leave"), st.integers(0, 2)),
    st.tuples(st.sampled_from(["subscribe", "unsubscribe"]), st.integers(0, 2), _filters),
    st.tuples(st.just("event"), _names, st.integers(1, 3)),  # seq step > 1: upstream gap
)


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_steps, max_size=60))
def test_routing_index_agrees_with_the_subscription_rules(steps: list[tuple]) -> None:  # type: ignore[type-arg]
    """Joins, leaves, subscription churn and events in any order: the index routes each
    event to exactly the sessions whose subscription matches it (and an upstream gap notice
    to every session that subscribes to anything)."""
    registry = {"a": ("k1", "l1"), "ab": ("k2", "l1"), "x-1": ("k1", "l2")}
    lookup = lambda d: registry.get(d, ("unknown", "unknown"))  # noqa: E731
    fanout = Fanout(lookup)
    seq = 0
    for step in steps:
        kind, *args = step
        client_id = f"c{args[0]}" if kind != "event" else ""
        if kind == "leave":
            fanout.remove(client_id)
        elif kind in ("subscribe", "unsubscribe"):
            if client_id not in fanout.sessions:  # joins on first use
                fanout.add(ClientSession(client_id, queue_limit=1000))
            if args[1]:
                fanout.sessions[client_id].receive(orjson.dumps({"op": kind, **args[1]}))
        elif kind == "event":
            device, step = args
            gap = seq > 0 and step > 1  # the first event of a source is never a gap
            seq += step
            woken = {s.client_id for s in fanout.on_event(live(device, seq), 0.0)}
            wanted = {s.client_id for s in fanout.sessions.values()
                      if s.subscription.matches(device, lookup(device))
                      or (gap and not s.subscription.is_empty())}
            assert woken == wanted, (device, gap, woken, wanted)


_burst_events = st.lists(st.tuples(st.sampled_from(["a", "ab", "b", "x-1"]),
                                   st.sampled_from([1, 1, 1, 2, -1])), max_size=40)


@settings(max_examples=200, deadline=None)
@given(subscriptions=st.lists(_filters, min_size=1, max_size=4), limits=st.lists(
    st.integers(1, 6), min_size=4, max_size=4), events=_burst_events,
    cuts=st.lists(st.integers(0, 40), max_size=5))
def test_a_burst_queues_exactly_what_the_same_events_one_by_one_would(
        subscriptions: list[dict[str, object]], limits: list[int],
        events: list[tuple[str, int]], cuts: list[int]) -> None:
    """on_events groups runs of events per routing entry; each client must still get the
    same frames in the same order, with the same gaps, drops and notices, as one by one."""
    registry = {"a": ("k1", "l1"), "ab": ("k2", "l1"), "x-1": ("k1", "l2")}
    lookup = lambda d: registry.get(d, ("unknown", "unknown"))  # noqa: E731
    fanouts = [Fanout(lookup), Fanout(lookup)]
    for fanout in fanouts:
        for i, filters in enumerate(subscriptions):
            session = ClientSession(f"c{i}", queue_limit=limits[i])
            fanout.add(session)
            if filters:
                session.receive(orjson.dumps({"op": "subscribe", **filters}))
            session.take(0.0)
    seq = 0
    stream: list[LiveEvent] = []
    for device, step in events:  # step -1: the source restarts at 1
        seq = 1 if step < 0 else seq + step
        stream.append(live(device, seq))
    one_by_one, in_bursts = fanouts
    woken_single: set[str] = set()
    for event in stream:
        woken_single |= {s.client_id for s in one_by_one.on_event(event, 0.0)}
    woken_bursts: set[str] = set()
    bounds = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    for start, end in itertools.pairwise(bounds):
        woken_bursts |= {s.client_id for s in in_bursts.on_events(stream[start:end], 0.0)}
    assert woken_bursts == woken_single
    for client_id, session in one_by_one.sessions.items():
        other = in_bursts.sessions[client_id]
        assert other.missed_total == session.missed_total
        assert other.take(0.0, 10**6) == session.take(0.0, 10**6)
    assert in_bursts.stats == one_by_one.stats


ADMIT_SECRET = b"admit-test-secret-0123456789abcdef"


def _admit(path: str = LIVE_PATH, query: dict[str, list[str]] | None = None,
           authorization: str | None = None, secret: bytes | None = ADMIT_SECRET,
           deny: DenyList | None = None, clients: int = 0) -> object:
    return admit(path, query or {}, authorization, secret, deny or DenyList(), clients, 10)


def test_admit_takes_a_client_token_from_the_header_or_the_query() -> None:
    token = issue_token(ADMIT_SECRET, "app", CLIENT_AUDIENCE, 60, token_id="t-1")
    assert _admit(authorization=f"Bearer {token}") == Admitted("app", "t-1")
    assert _admit(query={"token": [token]}) == Admitted("app", "t-1")


@pytest.mark.parametrize(("kwargs", "status", "reason"), [
    ({"path": "/v1/other"}, 404, "not_found"),
    ({"clients": 10}, 503, "too_many_clients"),
    ({}, 401, "missing"),
    ({"authorization": "Bearer x.y.z"}, 401, None),
    ({"deny": DenyList(clients=frozenset({"app"}))}, 403, "revoked"),
    ({"deny": DenyList(token_ids=frozenset({"t-1"}))}, 403, "revoked"),
])
def test_admit_refuses_with_a_status_and_a_reason(kwargs: dict[str, object], status: int,
                                                  reason: str | None) -> None:
    if "deny" in kwargs:
        token = issue_token(ADMIT_SECRET, "app", CLIENT_AUDIENCE, 60, token_id="t-1")
        kwargs = {**kwargs, "authorization": f"Bearer {token}"}
    verdict = _admit(**kwargs)  # type: ignore[arg-type]
    assert isinstance(verdict, Refused) and verdict.status == status, verdict
    assert reason is None or verdict.reason == reason
    assert verdict.detail


def test_admit_refuses_a_device_token_and_without_auth_names_the_client() -> None:
    device = issue_token(ADMIT_SECRET, "dev-1", DEVICE_AUDIENCE, 60)
    verdict = _admit(authorization=f"Bearer {device}")
    assert isinstance(verdict, Refused) and verdict.status == 401
    assert _admit(secret=None, query={"client": ["page"]}) == Admitted("page", None)
    assert _admit(secret=None) == Admitted("anonymous", None)



# -- wire framing ---------------------------------------------------------------------------


def unframe(wire: bytes) -> list[bytes]:
    """Split unmasked server text frames (RFC 6455 5.2) back into payloads."""
    payloads: list[bytes] = []
    at = 0
    while at < len(wire):
        assert wire[at] == 0x81  # FIN + text
        size = wire[at + 1]
        assert not size & 0x80  # server frames are never masked
        at += 2
        if size == 126:
            size, at = int.from_bytes(wire[at:at + 2], "big"), at + 2
        elif size == 127:
            size, at = int.from_bytes(wire[at:at + 8], "big"), at + 8
        payloads.append(wire[at:at + size])
        at += size
    assert at == len(wire)
    return payloads


def test_with_framing_an_event_is_framed_once_for_every_client_that_gets_it() -> None:
    from iotpipe.relay.sending import text_frame

    calls: list[bytes] = []

    def framing(payload: bytes) -> bytes:
        calls.append(payload)
        return text_frame(payload)

    fanout = Fanout(framing=framing)
    sessions = [subscribed(ClientSession(f"c{i}"), prefixes=["d"]) for i in range(3)]
    for session in sessions:
        session.take(0.0)  # the subscribe replies (taken before framing was set)
        fanout.add(session)
    fanout.on_event(live("d1", 1), 0.0)
    assert len(calls) == 1
    taken = [session.take(0.0) for session in sessions]
    assert taken[0][0] is taken[1][0] is taken[2][0]  # the same bytes object, not copies
    assert decoded(unframe(taken[0][0]))[0]["seq"] == 1


def test_with_framing_gaps_resets_and_replies_are_framed_too() -> None:
    from iotpipe.relay.sending import text_frame

    fanout = Fanout(framing=text_frame)
    session = ClientSession("s", queue_limit=2)
    fanout.add(session)
    session.answer(orjson.dumps({"op": "subscribe", "devices": ["d"]}), 0.0)
    for seq in range(1, 5):  # reply + 1 event fill the queue; 2..4 dropped
        fanout.on_event(live("d", seq), 0.0)
    fanout.on_event(live("d", 7), 0.0)  # upstream gap 5..6, then event 7 (no room)
    fanout.on_event(live("d", 1), 0.0)  # the source restarted
    frames = decoded(unframe(b"".join(session.take(0.0, max_frames=100))))
    # Each control frame is preceded by the gap notice for what was dropped before it.
    assert [(f["event"], f.get("reason"), f.get("missed")) for f in frames] == [
        ("subscribed", None, None), ("reading", None, None), ("gap", "slow_client", 3),
        ("gap", "upstream", 2), ("gap", "slow_client", 1), ("reset", None, None),
        ("gap", "slow_client", 1)]
    fanout.on_event(live("d", 2), 0.0)
    assert [f["seq"] for f in decoded(unframe(b"".join(session.take(0.0))))] == [2]
