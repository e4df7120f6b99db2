"""Sans-I/O device protocol: frame validation, timestamps, rate limits and flood policy."""

from __future__ import annotations

import orjson
import pytest

from iotpipe.ingest.core import (
    CLOSE_FLOOD,
    DeviceSession,
    FrameLimits,
    TokenBucket,
    encode_ack_frame,
    encode_busy_frame,
    parse_frame,
    parse_ts,
)
from iotpipe.wire import decode_reading

pytestmark = pytest.mark.unit

NOW_NS = 1_795_000_000 * 10**9


def reasons(frame: str | bytes, device: str | None = "dev-1", **limits: int) -> list[str]:
    return [e.reason for e in parse_frame(frame, device, NOW_NS, FrameLimits(**limits)).errors]


def test_single_message_becomes_a_reading() -> None:
    out = parse_frame(b'{"id": "m1", "ts": 1795000001.5, "data": {"t": 21.5, "ok": true}}',
                      "dev-1", NOW_NS)
    assert out.errors == []
    assert out.ids == ["m1"]
    reading = decode_reading(out.readings[0])
    assert reading.device_id == "dev-1"
    assert reading.msg_id == "m1"
    assert reading.ts_ns == 1_795_000_001_500_000_000
    assert orjson.loads(reading.data_json) == {"t": 21.5, "ok": True}
    assert reading.received_ns == NOW_NS


def test_missing_ts_uses_server_time_and_int_id_is_kept() -> None:
    out = parse_frame('{"id": 7, "data": {"v": null, "s": "x"}}', "dev-1", NOW_NS)
    assert out.ids == [7]
    reading = decode_reading(out.readings[0])
    assert reading.msg_id == "7"
    assert reading.ts_ns == NOW_NS


def test_batch_keeps_good_messages_and_names_bad_ones() -> None:
    frame = orjson.dumps([
        {"id": "a", "data": {"x": 1}},
        {"id": "b", "data": {"x": [1, 2]}},
        {"id": "c", "data": {"x": 2}, "device": "dev-2"},
        "not an object",
        {"data": {"x": 1}},
        {"id": "d", "ts": "yesterday", "data": {"x": 1}},
        {"id": "e"},
        {"id": "f", "data": {"x": 3}, "device": "dev-1"},
    ])
    out = parse_frame(frame, "dev-1", NOW_NS)
    assert out.ids == ["a", "f"]
    assert [(e.msg_id, e.reason) for e in out.errors] == [
        ("b", "bad_data"), ("c", "forbidden_device"), (None, "not_an_object"),
        (None, "missing_id"), ("d", "bad_ts"), ("e", "missing_data"),
    ]


@pytest.mark.parametrize(("frame", "reason"), [
    (b"{not json", "bad_json"),
    (b"\xff\xfe", "bad_json"),
    (b"[]", "empty_batch"),
    (b"42", "not_an_object"),
    (b'{"id": true, "data": {"x": 1}}', "bad_id"),
    (b'{"id": -1, "data": {"x": 1}}', "bad_id"),
    (b'{"id": "", "data": {"x": 1}}', "bad_id"),
    (b'{"id": 1.5, "data": {"x": 1}}', "bad_id"),
    (b'{"id": "x", "data": {}}', "bad_data"),
    (b'{"id": "x", "data": [1]}', "bad_data"),
    (b'{"id": "x", "data": {"": 1}}', "bad_data"),
    (b'{"id": "x", "data": {"k": {"nested": 1}}}', "bad_data"),
    (b'{"id": "x", "ts": true, "data": {"k": 1}}', "bad_ts"),
    (b'{"id": "x", "ts": 1795000000000, "data": {"k": 1}}', "bad_ts"),
    (b'{"id": "x", "ts": "2026-11-26T10:00:00", "data": {"k": 1}}', "bad_ts"),
    (b'{"id": "x", "ts": "2026-02-30T10:00:00Z", "data": {"k": 1}}', "bad_ts"),
])
def test_each_bad_input_names_its_reason(frame: bytes, reason: str) -> None:
    assert reasons(frame) == [reason]


def test_limits_are_enforced() -> None:
    assert reasons(orjson.dumps([{"id": i, "data": {"k": 1}} for i in range(4)]),
                   max_batch=3) == ["batch_too_large"]
    assert reasons(b'{"id": "abcdef", "data": {"k": 1}}', max_id_len=5) == ["bad_id"]
    assert reasons(b'{"id": "x", "data": {"a": 1, "b": 2, "c": 3}}', max_data_keys=2) \
        == ["bad_data"]
    assert reasons(b'{"id": "x", "data": {"abcdef": 1}}', max_key_len=5) == ["bad_data"]
    assert reasons(b'{"id": "x", "data": {"k": "abcdef"}}', max_str_len=5) == ["bad_data"]
    # A huge bad id is not echoed back.
    out = parse_frame(orjson.dumps({"id": "x" * 5000, "data": {"k": 1}}), "d", NOW_NS)
    assert out.errors[0].msg_id is None


def test_insecure_mode_takes_the_device_from_the_message() -> None:
    out = parse_frame(b'[{"id": 1, "device": "dev-9", "data": {"k": 1}}, {"id": 2, '
                      b'"data": {"k": 1}}]', None, NOW_NS)
    assert decode_reading(out.readings[0]).device_id == "dev-9"
    assert [e.reason for e in out.errors] == ["missing_device"]


@pytest.mark.parametrize(("text", "ns"), [
    ("2026-11-26T15:00:00Z", 1_795_705_200 * 10**9),
    ("2026-11-26T15:00:00.123456789Z", 1_795_705_200 * 10**9 + 123_456_789),
    ("2026-11-26T16:30:00.5+01:30", 1_795_705_200 * 10**9 + 500_000_000),
    ("2026-11-26t13:00:00-02:00", 1_795_705_200 * 10**9),
])
def test_rfc3339_timestamps(text: str, ns: int) -> None:
    assert parse_ts(text) == ns


def test_numeric_timestamps() -> None:
    assert parse_ts(1_795_705_200) == 1_795_705_200 * 10**9
    assert parse_ts(1_795_705_200.25) == 1_795_705_200_250_000_000
    assert parse_ts(1_795_705_200.123) == 1_795_705_200_123_000_000


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert bucket.take(3, 0.0) == 3
    assert bucket.take(3, 0.0) == 2
    assert bucket.take(1, 0.0) == 0
    assert bucket.retry_after_ms(1, 0.0) == 100
    assert bucket.retry_after_ms(100, 0.0) == 500  # capped at the burst
    assert bucket.take(1, 0.1) == 1
    assert bucket.take(10, 100.0) == 5  # never more than the burst
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)


def test_session_rate_limits_part_of_a_batch_and_never_acks_the_rest() -> None:
    session = DeviceSession("dev-1", bucket=TokenBucket(rate=1, burst=2, now=0.0))
    frame = orjson.dumps([{"id": i, "data": {"k": i}} for i in range(5)])
    out = session.on_frame(frame, 0.0, NOW_NS)
    assert out.ids == [0, 1]
    assert len(out.readings) == 2
    [reply] = [orjson.loads(r) for r in out.replies]
    assert reply == {"type": "error", "reason": "rate_limited", "ids": [2, 3, 4],
                     "detail": "per-device rate limit", "retry_after_ms": 2000}
    assert out.rejected == {"rate_limited": 3}
    assert out.close is None


def test_session_closes_a_flooding_device_after_n_limited_frames() -> None:
    session = DeviceSession("dev-1", bucket=TokenBucket(rate=1, burst=1, now=0.0),
                            flood_limit=3)
    frame = b'{"id": 1, "data": {"k": 1}}'
    assert session.on_frame(frame, 0.0, NOW_NS).ids == [1]
    assert session.on_frame(frame, 0.0, NOW_NS).close is None
    assert session.on_frame(frame, 0.0, NOW_NS).close is None
    # A frame that passes resets the count...
    assert session.on_frame(frame, 1.0, NOW_NS).ids == [1]
    assert session.on_frame(frame, 1.0, NOW_NS).close is None
    assert session.on_frame(frame, 1.0, NOW_NS).close is None
    # ...and the third limited frame in a row closes with 1008.
    assert session.on_frame(frame, 1.0, NOW_NS).close == (CLOSE_FLOOD, "rate limit exceeded")


def test_session_limits_garbage_floods_too() -> None:
    session = DeviceSession("dev-1", bucket=TokenBucket(rate=1, burst=1, now=0.0),
                            flood_limit=2)
    assert session.on_frame(b"garbage", 0.0, NOW_NS).close is None
    assert session.on_frame(b"garbage", 0.0, NOW_NS).close is None
    assert session.on_frame(b"garbage", 0.0, NOW_NS).close == (CLOSE_FLOOD, "rate limit exceeded")


def test_session_without_bucket_and_error_frames() -> None:
    session = DeviceSession("dev-1")
    out = session.on_frame(b'[{"id": "a", "data": {"k": 1}}, {"id": "b", "data": 5}]', 0, NOW_NS)
    assert out.ids == ["a"]
    assert [orjson.loads(r) for r in out.replies] == [
        {"type": "error", "reason": "bad_data", "ids": ["b"], "detail": "'data' must be an object"}
    ]
    assert orjson.loads(encode_ack_frame(["a", 2])) == {"type": "ack", "ids": ["a", 2]}
    assert orjson.loads(encode_busy_frame([1], 250)) == {"type": "busy", "ids": [1],
                                                         "retry_after_ms": 250}
