"""The live wire formats middle -> relay: v2 groups, v1 records, and telling them apart."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from iotpipe import wire
from iotpipe.middle.settings import MiddleSettings
from iotpipe.relay.settings import RelaySettings
from iotpipe.wire import LIVE_GROUP_RECORDS_MAX

pytestmark = pytest.mark.unit

device_ids = st.text(min_size=1, max_size=40).filter(lambda s: s.strip() != "")
readings = st.builds(wire.encode_reading, device_ids, st.text(max_size=10),
                     st.integers(0, 2**63 - 1), st.binary(max_size=30), st.integers(0, 2**63 - 1))


@given(st.text(max_size=70), st.integers(1, 2**64 - 1),
       st.lists(st.binary(max_size=300), min_size=1, max_size=40))
def test_group_round_trip(middle_id: str, first: int, group: list[bytes]) -> None:
    frames = wire.encode_live_group(middle_id, first, group)
    assert frames[:2] == [b"", wire.KIND_LIVE_V2]
    decoded = wire.decode_live_group(frames)
    assert decoded == wire.LiveGroup(middle_id, first, group)
    assert decoded.last == first + len(group) - 1


@given(st.text(max_size=20), st.integers(1, 2**40), st.lists(readings, min_size=1, max_size=20))
def test_group_events_are_what_v1_would_have_sent(middle_id: str, first: int,
                                                  group: list[bytes]) -> None:
    # The relay routes both versions through one path: a group must expand to exactly the
    # events the per-record format carries, seq by seq.
    v1 = [wire.decode_live_events(
        wire.encode_live(wire.decode_reading(r).device_id, middle_id, first + i, r))[0]
        for i, r in enumerate(group)]
    assert wire.decode_live_events(wire.encode_live_group(middle_id, first, group)) == v1


def test_group_event_of_a_reading_without_device_id_keeps_its_seq() -> None:
    good = wire.encode_reading("d", "m", 1, b"{}", 2)
    bad_utf8 = b"\x95\xa2\xff\xfe" + good[4:]
    events = wire.live_group_events(wire.LiveGroup("m0", 7, [b"\xc1", good, bad_utf8]))
    assert [(e.device_id, e.seq) for e in events] == [("", 7), ("d", 8), ("", 9)]


def test_v1_event_is_still_read() -> None:
    frames = wire.encode_live("dev-é", "middle-0", 99, b"reading")
    assert wire.decode_live_events(frames) == [wire.LiveEvent("dev-é", "middle-0", 99,
                                                              b"reading")]


def test_a_v1_relay_refuses_a_group_instead_of_misreading_it() -> None:
    # An old relay calls decode_live on every message: a group must fail there, never
    # decode as a (wrong) event that would move its per-source seq.
    with pytest.raises(wire.WireError):
        wire.decode_live(wire.encode_live_group("m0", 5, [b"r"]))


def _header(**fields: object) -> bytes:
    return msgpack.packb({"m": "m0", "first": 1, "n": 1, **fields})


@pytest.mark.parametrize(("frames", "match"), [
    ([b"", wire.KIND_LIVE_V2, _header()], "expected"),
    ([b"", b"iotpipe.live.v9", _header(), msgpack.packb([b"r"])], "expected"),
    ([b"x", wire.KIND_LIVE_V2, _header(), msgpack.packb([b"r"])], "expected"),
    ([b"", wire.KIND_LIVE_V2, b"\xc1", msgpack.packb([b"r"])], "not valid msgpack"),
    ([b"", wire.KIND_LIVE_V2, _header(m=3), msgpack.packb([b"r"])], "'m'"),
    ([b"", wire.KIND_LIVE_V2, _header(first=True), msgpack.packb([b"r"])], "'first'"),
    ([b"", wire.KIND_LIVE_V2, _header(first=0), msgpack.packb([b"r"])], ">= 1"),
    ([b"", wire.KIND_LIVE_V2, _header(n=2), msgpack.packb([b"r"])], "says 2"),
    ([b"", wire.KIND_LIVE_V2, _header(n=0), msgpack.packb([])], "says 0"),
    ([b"", wire.KIND_LIVE_V2, _header(), msgpack.packb(["r"])], "array of bin"),
    ([b"", wire.KIND_LIVE_V2, _header(), msgpack.packb({"r": 1})], "array of bin"),
])
def test_malformed_group_is_refused(frames: list[bytes], match: str) -> None:
    with pytest.raises(wire.WireError, match=match):
        wire.decode_live_group(frames)
    if frames[0] == b"" and len(frames) == 4:
        with pytest.raises(wire.WireError):
            wire.decode_live_events(frames)


def test_subscribers_hold_about_sub_hwm_readings_whatever_the_message_size() -> None:
    """ZeroMQ bounds a SUB socket in messages; a v2 message holds up to
    LIVE_GROUP_RECORDS_MAX readings, so the relay's bound in readings must divide by it."""
    relay = RelaySettings(sub_hwm=100_000)
    assert relay.sub_rcvhwm * LIVE_GROUP_RECORDS_MAX >= 100_000
    assert (relay.sub_rcvhwm - 1) * LIVE_GROUP_RECORDS_MAX < 100_000
    assert RelaySettings(sub_hwm=1).sub_rcvhwm == 1
    # ...which only holds while no middle puts more readings in one message.
    MiddleSettings(live_group_records=LIVE_GROUP_RECORDS_MAX)
    with pytest.raises(ValidationError, match="live_group_records"):
        MiddleSettings(live_group_records=LIVE_GROUP_RECORDS_MAX + 1)
