"""The C frame accelerator (``ingest/core/_frames.c``) against ``parse_frame``'s Python.

The C path accepts frames whose every message is valid in the common forms and hands all
others to Python, so the two must agree on every frame: the same ids, the same reading
bytes, the same refusals. Generated frames sit on every limit, type and msgpack header
boundary.
"""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support.cmodules import c_module

from iotpipe import wire
from iotpipe.ingest.core import frames
from iotpipe.ingest.core.frames import FrameLimits, parse_frame, parse_frame_python

pytestmark = pytest.mark.unit

LIMITS = FrameLimits(max_batch=3, max_id_len=8, max_data_keys=3, max_key_len=4, max_str_len=5)
TS_MIN, TS_MAX = 946_684_800, 4_102_444_800
RECEIVED = st.one_of(st.integers(0, 2**63 - 1),
                     st.sampled_from([0, 127, 128, 2**32, 1_764_500_000_123_456_789]))


def _accept(frame: bytes, device: str | None, received_ns: int,
            limits: FrameLimits = LIMITS) -> object:
    c = c_module("iotpipe.ingest.core._frames")
    return c.accept_frame(orjson.loads(frame), device, received_ns, limits.max_batch,
                          limits.max_id_len, limits.max_data_keys, limits.max_key_len,
                          limits.max_str_len, orjson.dumps)


def test_c_module_is_built_and_used() -> None:
    c = c_module("iotpipe.ingest.core._frames")
    assert frames.ACCEPT_FRAME is c.accept_frame


def test_common_frame_is_accepted_in_c_with_the_python_bytes() -> None:
    frame = orjson.dumps([{"id": "a1", "data": {"t": 21.5, "ok": True}},
                          {"id": 7, "ts": 1_764_500_000.25, "device": "dev-1",
                           "data": {"s": "hi", "n": None}}])
    accepted = _accept(frame, "dev-1", 1_764_500_001_000_000_000)
    assert accepted == (["a1", 7], [
        wire.encode_reading("dev-1", "a1", 1_764_500_001_000_000_000, b'{"t":21.5,"ok":true}',
                            1_764_500_001_000_000_000),
        wire.encode_reading("dev-1", "7", 1_764_500_000_250_000_000, b'{"s":"hi","n":null}',
                            1_764_500_001_000_000_000),
    ])


@pytest.mark.parametrize("message", [
    {"id": "a", "ts": "2026-11-30T12:00:00Z", "data": {"v": 1}},  # valid, judged in Python
    {"id": "a", "ts": True, "data": {"v": 1}},
    {"id": "a", "ts": 1e300, "data": {"v": 1}},
    {"id": "a", "ts": TS_MAX, "data": {"v": 1}},
    {"id": True, "data": {"v": 1}},
    {"id": 2**63, "data": {"v": 1}},
    {"id": -1, "data": {"v": 1}},
    {"id": "", "data": {"v": 1}},
    {"id": "a", "device": "other", "data": {"v": 1}},
    {"id": "a", "data": {}},
    {"id": "a", "data": {"v": [1]}},
    {"id": "a", "data": {"v": "toolong"}},
    {"id": "a", "data": {"": 1}},
    {"id": "a"},
    {"data": {"v": 1}},
])
def test_anything_uncommon_goes_to_python(message: dict[str, object]) -> None:
    assert _accept(orjson.dumps(message), "dev-1", 1) is None
    assert _accept(orjson.dumps([{"id": "ok", "data": {"v": 1}}, message]), "dev-1", 1) is None


def test_without_an_authenticated_device_the_message_names_its_own() -> None:
    frame = orjson.dumps({"id": "a", "device": "sensor-9", "data": {"v": 1}})
    assert _accept(frame, None, 5) == (["a"], [wire.encode_reading("sensor-9", "a", 5,
                                                                   b'{"v":1}', 5)])
    assert _accept(orjson.dumps({"id": "a", "data": {"v": 1}}), None, 5) is None


def test_float_ts_rounds_to_microseconds_like_python() -> None:
    # Ties to even, as Python's round(): .0000005 s is half a microsecond.
    for ts in (1_764_500_000.0000005, 1_764_500_000.0000015, 1_764_500_000.9999996,
               TS_MIN - 0.0000004, TS_MAX - 1e-6):
        frame = orjson.dumps({"id": "a", "ts": ts, "data": {"v": 1}})
        assert parse_frame(frame, "d", 1) == parse_frame_python(frame, "d", 1), ts


IDS = st.one_of(
    st.text(max_size=10), st.integers(-5, 2**64), st.booleans(), st.none(), st.floats(),
    st.sampled_from(["", "x" * 8, "x" * 9, "é" * 8, "\U0001f600" * 8, 0, 2**63 - 1, 2**63]))
TS = st.one_of(
    st.none(), st.integers(TS_MIN - 2, TS_MIN + 2), st.integers(TS_MAX - 2, TS_MAX + 2),
    st.integers(-2**70, 2**70),
    st.floats(TS_MIN - 2, TS_MAX + 2), st.floats(allow_nan=False),
    st.sampled_from([True, False, "2026-11-30T12:00:00Z", "2026-11-30", [], {}]))
KEYS = st.one_of(st.text(max_size=5), st.sampled_from(["", "a", "abcd", "abcde", "é" * 4]))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64), st.floats(),
                   st.text(max_size=7), st.lists(st.integers(), max_size=2),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
DATA = st.one_of(st.dictionaries(KEYS, VALUES, max_size=4), st.none(), st.integers(),
                 st.text(max_size=3), st.lists(st.integers(), max_size=2))
DEVICES = st.one_of(st.none(), st.sampled_from(["dev-1", "other", "", "é" * 40]), st.integers())


# Valid in the common forms, near the limits: what the C path must accept.
GOOD_IDS = st.one_of(st.text(min_size=1, max_size=8), st.integers(0, 2**63 - 1),
                     st.sampled_from(["x" * 8, "é" * 8, "\U0001f600" * 8, 0, 127, 128, 2**63 - 1]))
GOOD_TS = st.one_of(st.none(), st.integers(TS_MIN, TS_MAX - 1),
                    st.floats(TS_MIN - 0.4999, TS_MAX - 0.5000001))
GOOD_DATA = st.dictionaries(
    st.text(min_size=1, max_size=4),
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5)),
    min_size=1, max_size=3)


@st.composite
def messages(draw: st.DrawFn) -> object:
    """Mostly valid messages, each field sometimes replaced by anything at all."""
    message: dict[str, object] = {"id": draw(GOOD_IDS), "data": draw(GOOD_DATA)}
    if draw(st.booleans()):
        message["ts"] = draw(GOOD_TS)
    if draw(st.booleans()):
        message["device"] = draw(st.sampled_from(["dev-1", None]))
    for key, values in (("id", IDS), ("ts", TS), ("data", DATA), ("device", DEVICES)):
        if draw(st.integers(0, 9)) == 0:
            message[key] = draw(values)
        elif key in message and draw(st.integers(0, 19)) == 0:
            del message[key]
    if draw(st.integers(0, 4)) == 0:
        message[draw(st.text(max_size=3))] = draw(VALUES)
    if draw(st.integers(0, 19)) == 0:
        return draw(st.one_of(st.integers(), st.text(max_size=2), st.none()))
    return message


def _json(doc: object) -> bytes | None:
    try:  # orjson refuses what no device could send either (ints past 64 bits, NaN...)
        encoded = orjson.dumps(doc)
    except (orjson.JSONEncodeError, TypeError):
        return None
    if isinstance(doc, dict) and any(isinstance(v, float) and not math.isfinite(v)
                                     for v in doc.values()):
        return None
    return encoded


@settings(max_examples=1000, deadline=None)
@given(doc=st.one_of(messages(), st.lists(messages(), max_size=4)),
       device=st.one_of(st.none(), st.sampled_from(["dev-1", "dev-1", "é" * 40, "x" * 300])),
       received_ns=RECEIVED)
def test_c_and_python_judge_every_frame_alike(doc: object, device: str | None,
                                              received_ns: int) -> None:
    frame = _json(doc)
    if frame is None:
        return
    try:
        expected = parse_frame_python(frame, device, received_ns, LIMITS)
    except Exception as exc:  # whatever Python raises, C must raise too
        with pytest.raises(type(exc)):
            parse_frame(frame, device, received_ns, LIMITS)
        return
    assert parse_frame(frame, device, received_ns, LIMITS) == expected
