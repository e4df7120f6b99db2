"""The picows front's connection logic without sockets: reply order, one write per group,
backpressure, closes after the replies owed, fragmented messages (fake transport, commit
groups completed by the test)."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson
import pytest
from picows import WSCloseCode, WSMsgType, WSProtocolError
from picows.picows import _make_test_ws_frame

from iotpipe.ingest.core import DeviceBuckets, FrameLimits, TokenBucket
from iotpipe.ingest.front import OUTBOX_FRAMES, DeviceConnection, PicowsFront
from iotpipe.ingest.metrics import IngestCounters
from iotpipe.ingest.settings import IngestSettings
from iotpipe.queue import QueueError, QueueFull
from iotpipe.wsframes import encode_text_frames

pytestmark = pytest.mark.unit


class FakeRaw:
    """The underlying asyncio transport: records writes and read pauses."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.paused = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class FakeTransport:
    def __init__(self) -> None:
        self.underlying_transport = FakeRaw()
        self.is_close_frame_sent = False
        self.is_disconnected = False
        self.closes: list[tuple[int, bytes]] = []

    def send(self, kind: WSMsgType, payload: bytes) -> None:
        assert kind == WSMsgType.TEXT
        self.underlying_transport.write(encode_text_frames([payload]))

    def send_close(self, code: int, reason: bytes = b"") -> None:
        self.is_close_frame_sent = True
        self.closes.append((int(code), reason))

    def disconnect(self) -> None:
        self.is_disconnected = True


class FakeCommitter:
    """``AsyncQueue.submit`` as the front uses it: every submit joins the open group; the
    test completes groups one at a time."""

    def __init__(self) -> None:
        self.groups: list[asyncio.Future[None]] = []
        self.submitted: list[list[bytes]] = []
        self._open: asyncio.Future[None] | None = None

    def submit(self, readings: list[bytes], timeout: float) -> asyncio.Future[None]:
        assert timeout == 1.0  # the server's busy_wait
        self.submitted.append(readings)
        if self._open is None:
            self._open = asyncio.get_running_loop().create_future()
            self.groups.append(self._open)
        return self._open

    def finish(self, error: Exception | None = None) -> None:
        group, self._open = self._open, None
        assert group is not None
        if error is None:
            group.set_result(None)
        else:
            group.set_exception(error)


class FakeServer:
    def __init__(self, **settings: Any) -> None:
        self.settings = IngestSettings(insecure_no_auth=True, rate_limit=0,
                                       middle_endpoints=["tcp://127.0.0.1:1"], **settings)
        self.limits = FrameLimits()
        self.buckets = DeviceBuckets(0, 0)
        self.counters = IngestCounters()
        self.aqueue = FakeCommitter()


def parse_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split server-to-client frames (unmasked): (opcode byte, payload) each."""
    frames = []
    pos = 0
    while pos < len(data):
        first, size = data[pos], data[pos + 1] & 0x7F
        pos += 2
        if size == 126:
            (size,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif size == 127:
            (size,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        frames.append((first, data[pos:pos + size]))
        pos += size
    return frames


def replies(raw: FakeRaw) -> list[list[dict[str, Any]]]:
    """Each write as the list of JSON replies it carried."""
    out = []
    for data in raw.writes:
        frames = parse_frames(data)
        assert all(first == 0x81 for first, _ in frames)  # FIN + text
        out.append([orjson.loads(payload) for _, payload in frames])
    return out


async def connect(**settings: Any) -> tuple[DeviceConnection, FakeTransport, FakeServer]:
    server = FakeServer(**settings)
    front = PicowsFront(server, lambda path, auth: None)  # type: ignore[arg-type]
    conn = DeviceConnection(front, "dev-1", None)
    transport = FakeTransport()
    conn.on_ws_connected(transport)  # type: ignore[arg-type]
    return conn, transport, server


def text(conn: DeviceConnection, transport: FakeTransport, body: Any, fin: bool = True,
         kind: WSMsgType = WSMsgType.TEXT) -> None:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    conn.on_ws_frame(transport, _make_test_ws_frame(kind, payload, fin, False))  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(3):  # future callbacks run on the next loop turns
        await asyncio.sleep(0)


def test_text_frame_headers_for_each_length_encoding() -> None:
    for size in (0, 125, 126, 65535, 65536, 70000):
        payload = b"x" * size
        [(first, body)] = parse_frames(encode_text_frames([payload]))
        assert (first, body) == (0x81, payload)
    assert encode_text_frames([b"ab"]) == b"\x81\x02ab"
    assert encode_text_frames([b"a" * 126])[:4] == b"\x81\x7e\x00\x7e"


async def test_acks_of_one_group_leave_in_one_write_in_order() -> None:
    conn, transport, server = await connect()
    text(conn, transport, {"id": 1, "data": {"k": 1}})
    text(conn, transport, {"id": 2, "data": {"k": [1]}})   # bad: an error frame
    text(conn, transport, [{"id": 3, "data": {"k": 3}}, {"id": 4, "data": {"k": 4}}])
    # Nothing leaves before the group is durable: the error waits behind ack 1 (order).
    assert transport.underlying_transport.writes == []
    assert len(server.aqueue.groups) == 1
    server.aqueue.finish()
    await settle()
    [write] = replies(transport.underlying_transport)
    assert [(r["type"], r["ids"]) for r in write] == [("ack", [1]), ("error", [2]),
                                                      ("ack", [3, 4])]
    assert server.counters.accepted == 3 and server.counters.ack_frames == 2


async def test_connections_of_one_group_share_one_callback_and_each_gets_its_ack() -> None:
    conn, transport, server = await connect()
    others = []
    for i in range(3):
        other = DeviceConnection(conn.front, f"dev-{i + 2}", None)
        other_transport = FakeTransport()
        other.on_ws_connected(other_transport)  # type: ignore[arg-type]
        others.append((other, other_transport))
    for i, (c, t) in enumerate([(conn, transport), *others]):
        text(c, t, {"id": i, "data": {"k": i}})
        text(c, t, {"id": 10 + i, "data": {"k": i}})
    [group] = server.aqueue.groups
    # One done-callback for the whole group (not one per connection, nor per frame).
    assert len(group._callbacks) == 1  # type: ignore[attr-defined]
    server.aqueue.finish()
    await settle()
    for i, (_, t) in enumerate([(conn, transport), *others]):
        assert [[r["ids"] for r in write] for write in replies(t.underlying_transport)] == [
            [[i], [10 + i]]]


async def test_a_connection_that_fails_to_write_does_not_hold_the_others_acks() -> None:
    conn, transport, server = await connect()
    other = DeviceConnection(conn.front, "dev-2", None)
    other_transport = FakeTransport()
    other.on_ws_connected(other_transport)  # type: ignore[arg-type]
    text(conn, transport, {"id": 1, "data": {"k": 1}})
    text(other, other_transport, {"id": 2, "data": {"k": 2}})

    def broken(kind: WSMsgType, payload: bytes) -> None:
        raise RuntimeError("socket gone wrong")

    transport.send = broken  # type: ignore[method-assign]
    server.aqueue.finish()
    await settle()
    assert [r[0]["ids"] for r in replies(other_transport.underlying_transport)] == [[2]]


async def test_errors_leave_at_once_when_no_ack_is_owed() -> None:
    conn, transport, _ = await connect()
    text(conn, transport, b"{not json")
    assert [r[0]["reason"] for r in replies(transport.underlying_transport)] == ["bad_json"]


async def test_busy_device_is_not_read_beyond_the_outbox_and_resumes_in_order() -> None:
    conn, transport, server = await connect()
    raw = transport.underlying_transport
    for i in range(OUTBOX_FRAMES + 4):
        text(conn, transport, {"id": i, "data": {"k": i}})
    assert raw.paused
    # Frames received past the outbox wait unjudged (picows had them in its buffer).
    assert len(server.aqueue.submitted) == OUTBOX_FRAMES
    server.aqueue.finish()
    await settle()
    assert not raw.paused
    assert len(server.aqueue.submitted) == OUTBOX_FRAMES + 4
    server.aqueue.finish()
    await settle()
    acked = [i for write in replies(raw) for r in write for i in r["ids"]]
    assert acked == list(range(OUTBOX_FRAMES + 4))
    assert len(raw.writes) == 2  # one write per durable group


async def test_queue_full_answers_busy_with_the_retry_hint() -> None:
    conn, transport, server = await connect(busy_retry_ms=250)
    text(conn, transport, {"id": "a", "data": {"k": 1}})
    server.aqueue.finish(QueueFull("full"))
    await settle()
    assert replies(transport.underlying_transport) == [
        [{"type": "busy", "ids": ["a"], "retry_after_ms": 250}]]
    assert server.counters.busy == 1 and server.counters.accepted == 0
    assert not transport.closes


async def test_queue_failure_is_never_acked_and_closes_1011() -> None:
    conn, transport, server = await connect()
    text(conn, transport, {"id": "a", "data": {"k": 1}})
    text(conn, transport, {"id": "b", "data": {"k": 1}})
    server.aqueue.finish(QueueError("disk gone"))
    await settle()
    [[error]] = replies(transport.underlying_transport)
    assert (error["type"], error["reason"], error["ids"]) == ("error", "internal", ["a"])
    assert [code for code, _ in transport.closes] == [1011]
    text(conn, transport, {"id": "c", "data": {"k": 1}})  # after the close: dropped
    assert len(server.aqueue.submitted) == 2
    assert server.counters.accepted == 0


async def test_requested_close_waits_for_the_acks_owed() -> None:
    conn, transport, server = await connect()
    text(conn, transport, {"id": 1, "data": {"k": 1}})
    conn.request_close(1001, "going away")
    assert transport.closes == []
    text(conn, transport, {"id": 2, "data": {"k": 1}})  # read while closing: dropped
    server.aqueue.finish()
    await settle()
    assert replies(transport.underlying_transport) == [[{"type": "ack", "ids": [1]}]]
    assert transport.closes == [(1001, b"going away")]
    assert len(server.aqueue.submitted) == 1
    assert server.counters.closes["1001"] == 1


async def test_flood_close_follows_the_rate_limited_replies() -> None:
    conn, transport, server = await connect()
    # One token, never refilled in this test's time: the second frame on is limited.
    conn.session.bucket = TokenBucket(1, 1, conn.front.loop.time())  # type: ignore[union-attr]
    conn.session.flood_limit = 2  # type: ignore[union-attr]
    for i in range(4):
        text(conn, transport, {"id": i, "data": {"k": i}})
    server.aqueue.finish()
    await settle()
    [write] = replies(transport.underlying_transport)
    assert [(r["type"], r["ids"]) for r in write] == [("ack", [0]), ("error", [1]),
                                                      ("error", [2])]
    assert [code for code, _ in transport.closes] == [1008]


async def test_fragmented_message_is_joined_and_limited_as_a_whole() -> None:
    conn, transport, server = await connect(max_frame_bytes=256)
    body = orjson.dumps({"id": "f", "data": {"k": "x" * 40}})
    text(conn, transport, body[:10], fin=False)
    text(conn, transport, body[10:30], fin=False, kind=WSMsgType.CONTINUATION)
    text(conn, transport, body[30:], fin=True, kind=WSMsgType.CONTINUATION)
    assert len(server.aqueue.submitted) == 1
    text(conn, transport, b"[" + b" " * 200, fin=False)
    with pytest.raises(WSProtocolError) as too_big:
        text(conn, transport, b" " * 100, fin=False, kind=WSMsgType.CONTINUATION)
    assert too_big.value.code == WSCloseCode.MESSAGE_TOO_BIG


async def test_device_close_is_echoed_and_the_connection_released() -> None:
    conn, transport, server = await connect()
    assert server.counters.connections == 1
    close = struct.pack("!H", 1000) + b"bye"
    conn.on_ws_frame(transport,  # type: ignore[arg-type]
                     _make_test_ws_frame(WSMsgType.CLOSE, close, True, False))
    assert [code for code, _ in transport.closes] == [1000]
    assert transport.is_disconnected
    conn.on_ws_disconnected(transport)  # type: ignore[arg-type]
    assert server.counters.connections == 0
    assert conn.closed.done()
