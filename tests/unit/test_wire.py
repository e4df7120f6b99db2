"""Round trips and rejections of the inter-tier wire formats."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotpipe import wire

pytestmark = pytest.mark.unit


def test_reading_round_trip() -> None:
    data = wire.encode_reading("dev-1", "m-7", 1_700_000_000_000_000_000, b'{"t":21.5}', 42)
    assert wire.decode_reading(data) == wire.Reading(
        "dev-1", "m-7", 1_700_000_000_000_000_000, b'{"t":21.5}', 42
    )


def test_reading_rejects_wrong_shape() -> None:
    with pytest.raises(wire.WireError, match="reading"):
        wire.decode_reading(msgpack.packb(["dev", "id", "not-an-int", b"{}", 1]))
    with pytest.raises(wire.WireError, match="not valid msgpack"):
        wire.decode_reading(b"\xc1")


def test_batch_round_trip_and_ack() -> None:
    frames = wire.encode_batch("pod-0-p0", 11, [b"a", b"b", b"c"])
    batch = wire.decode_batch(frames)
    assert batch == wire.Batch("pod-0-p0", 11, [b"a", b"b", b"c"])
    assert batch.last == 13
    assert wire.decode_ack(wire.encode_ack("pod-0-p0", 13)) == wire.Ack("pod-0-p0", 13)
    busy = wire.decode_busy(wire.encode_busy("n", 11, 250, "log full"))
    assert busy == wire.Busy("n", 11, 250, "log full")


@given(st.text(max_size=300), st.integers(-(2**63), 2**64 - 1))
def test_ack_is_the_packed_map_whatever_the_node_and_seq(node: str, last: int) -> None:
    """encode_ack reuses the packed prefix of each node's acks: still the bytes of the map."""
    expected = [wire.KIND_ACK, msgpack.packb({"node": node, "last": last}, use_bin_type=True)]
    assert wire.encode_ack(node, last) == expected
    assert wire.encode_ack(node, last) == expected  # the second from the cached prefix


def test_batch_v2_is_three_frames_and_v1_is_still_read() -> None:
    readings = [b"a", b"\x00" * 300, b""]
    frames = wire.encode_batch("n", 4, readings)
    assert frames[0] == wire.KIND_BATCH_V2 and len(frames) == 3
    assert wire.decode_batch(frames) == wire.Batch("n", 4, readings)
    old = wire.encode_batch_v1("n", 4, readings)
    assert old[0] == wire.KIND_BATCH and len(old) == 2 + len(readings)
    assert wire.decode_batch(old) == wire.Batch("n", 4, readings)


def test_batch_v2_malformed_bodies_are_rejected() -> None:
    header = msgpack.packb({"node": "n", "first": 1, "n": 2})
    with pytest.raises(wire.WireError, match="array of bin"):
        wire.decode_batch([wire.KIND_BATCH_V2, header, msgpack.packb(["a", "b"])])
    with pytest.raises(wire.WireError, match="3 frames"):
        wire.decode_batch([wire.KIND_BATCH_V2, header, msgpack.packb([b"a"]), b"b"])
    with pytest.raises(wire.WireError, match="not valid msgpack"):
        wire.decode_batch([wire.KIND_BATCH_V2, header, b"\xc1"])
    with pytest.raises(wire.WireError, match="expected kind"):
        wire.decode_batch([b"iotpipe.batch.v3", header, msgpack.packb([b"a", b"b"])])


def test_batch_count_mismatch_is_rejected() -> None:
    frames = wire.encode_batch("n", 1, [b"a", b"b"])
    header = msgpack.packb({"node": "n", "first": 1, "n": 2})
    with pytest.raises(wire.WireError, match="header says 2 readings, got 1"):
        wire.decode_batch([wire.KIND_BATCH_V2, header, msgpack.packb([b"a"])])
    with pytest.raises(wire.WireError, match="header says 2 readings, got 1"):
        wire.decode_batch(wire.encode_batch_v1("n", 1, [b"a", b"b"])[:-1])
    assert wire.decode_batch(frames).readings == [b"a", b"b"]
    with pytest.raises(wire.WireError, match="'node' must be str"):
        wire.decode_batch([wire.KIND_BATCH, msgpack.packb({"node": 1, "first": 1, "n": 1}), b"x"])


def test_log_record_and_live_event() -> None:
    rec = wire.encode_log_record("n", 5, b"reading")
    assert wire.decode_log_record(rec) == wire.LogRecord("n", 5, b"reading")
    frames = wire.encode_live("dev-é", "middle-0", 99, b"reading")
    assert frames[0] == "dev-é".encode()
    assert wire.decode_live(frames) == wire.LiveEvent("dev-é", "middle-0", 99, b"reading")


def test_feed_request_and_records() -> None:
    req = wire.decode_feed_request(wire.encode_feed_request("storage", "s-0", 512, [(1, 10)]))
    assert req == wire.FeedRequest("storage", "s-0", 512, [(1, 10)])
    with pytest.raises(wire.WireError, match="each ack"):
        wire.decode_feed_request(wire.encode_feed_request("g", "c", 1, [(5, 2)]))
    recs = wire.decode_records(wire.encode_records("storage", "middle-0", 7, [b"x", b"y"]))
    assert recs == wire.Records("storage", "middle-0", 7, [b"x", b"y"])
    assert recs.last == 8
