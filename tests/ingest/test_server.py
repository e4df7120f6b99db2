"""In-process ingest server against fake middles: acks, auth, bad input, floods, busy, failover."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from support.ingest import SECRET, FakeMiddle
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from iotpipe.auth import CLIENT_AUDIENCE, DEVICE_AUDIENCE, issue_token
from iotpipe.ingest.identity import INCARNATION_FILE
from iotpipe.ingest.server import IngestServer, IngestSettings
from iotpipe.ingest.settings import listen_backlog
from iotpipe.queue import PersistentQueue
from iotpipe.wire import decode_reading

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

Factory = Callable[..., Any]


@pytest.fixture
def middles() -> Any:
    created: list[FakeMiddle] = []

    def make(**kwargs: Any) -> FakeMiddle:
        middle = FakeMiddle(**kwargs)
        created.append(middle)
        return middle

    yield make
    for middle in created:
        middle.close()


# Every behaviour of the device protocol is checked on both WebSocket cores.
@pytest.fixture(params=["picows", "websockets"])
def ws_core(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def ingest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                 middles: Factory, ws_core: str) -> AsyncIterator[Factory]:
    monkeypatch.setenv("IOTPIPE_AUTH_SECRET", SECRET)
    servers: list[IngestServer] = []

    async def start(middle_list: list[FakeMiddle] | None = None, **overrides: Any
                    ) -> IngestServer:
        middle_list = middle_list or [middles()]
        values: dict[str, Any] = {
            "host": "127.0.0.1", "port": 0, "data_dir": tmp_path / f"q{len(servers)}",
            "node_id": "test-node", "middle_endpoints": [m.endpoint for m in middle_list],
            "forward_ack_timeout": 1.0, "ws_core": ws_core,
        }
        values.update(overrides)
        server = IngestServer(IngestSettings(**values), 0)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.aclose()


def url(server: IngestServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/v1/ingest{query}"


def device_connect(server: IngestServer, device: str, **kwargs: Any) -> Any:
    token = issue_token(SECRET.encode(), device, DEVICE_AUDIENCE, 60)
    return connect(url(server), additional_headers={"Authorization": f"Bearer {token}"},
                   compression=None, **kwargs)


async def reply(ws: ClientConnection) -> dict[str, Any]:
    return orjson.loads(await asyncio.wait_for(ws.recv(), 5.0))


async def test_acked_messages_reach_the_middle_as_readings(ingest: Factory,
                                                           middles: Factory) -> None:
    middle = middles()
    server = await ingest([middle])
    async with device_connect(server, "dev-1") as ws:
        await ws.send(orjson.dumps({"id": "a", "ts": "2026-11-26T15:00:00Z",
                                    "data": {"t": 21.5}}).decode())
        assert await reply(ws) == {"type": "ack", "ids": ["a"]}
        await ws.send(orjson.dumps([{"id": 1, "data": {"t": 1}}, {"id": 2, "data": {"t": 2}}]))
        assert await reply(ws) == {"type": "ack", "ids": [1, 2]}
    assert await middle.until(lambda m: len(m.stored) == 3, 5)
    readings = sorted((decode_reading(r) for r in middle.stored.values()), key=lambda r: r.msg_id)
    assert [(r.device_id, r.msg_id) for r in readings] == [("dev-1", "1"), ("dev-1", "2"),
                                                            ("dev-1", "a")]
    assert readings[2].ts_ns == 1_795_705_200 * 10**9
    assert orjson.loads(readings[2].data_json) == {"t": 21.5}
    # One identity: the pod's process name plus the queue's incarnation (see identity.py).
    assert {node for node, _ in middle.stored} == {server.node}
    assert server.node.startswith("test-node-p0~")
    assert sorted(seq for _, seq in middle.stored) == [1, 2, 3]
    # Once acked by the middle the queue is empty.
    assert server.forwarder is not None
    assert await asyncio.to_thread(server.forwarder.wait_empty, 5.0)
    assert server.queue is not None and server.queue.depth().records == 0


@pytest.mark.parametrize("case", ["missing", "malformed", "bad_signature", "expired",
                                  "wrong_audience"])
async def test_bad_tokens_get_401_naming_the_reason(ingest: Factory, case: str) -> None:
    server = await ingest()
    secret = SECRET.encode()
    headers = {
        "missing": {},
        "malformed": {"Authorization": "Bearer not-a-jwt"},
        "bad_signature": {"Authorization": "Bearer " + issue_token(
            b"forged-secret-forged-secret-forged-secret", "dev-1", DEVICE_AUDIENCE, 60)},
        "expired": {"Authorization": "Bearer " + jwt.encode(
            {"sub": "dev-1", "aud": DEVICE_AUDIENCE, "exp": int(time.time()) - 10}, secret)},
        "wrong_audience": {"Authorization": "Bearer " + issue_token(
            secret, "dev-1", CLIENT_AUDIENCE, 60)},
    }[case]
    with pytest.raises(InvalidStatus) as info:
        async with connect(url(server), additional_headers=headers):
            pass
    response = info.value.response
    assert response.status_code == 401
    assert response.body.decode().startswith(case)


async def test_wrong_path_is_404(ingest: Factory) -> None:
    server = await ingest()
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://127.0.0.1:{server.port}/other"):
            pass
    assert info.value.response.status_code == 404


async def test_bad_input_gets_errors_and_others_carry_on(ingest: Factory,
                                                          middles: Factory) -> None:
    middle = middles()
    server = await ingest([middle], max_frame_bytes=2048)
    async with device_connect(server, "good") as good, device_connect(server, "bad") as bad:
        await bad.send("{not json")
        assert (await reply(bad))["reason"] == "bad_json"
        await bad.send(orjson.dumps({"id": "w", "data": {"k": [1]}}).decode())
        assert await reply(bad) == {"type": "error", "reason": "bad_data", "ids": ["w"],
                                    "detail": "'data.k' must be a number, string, boolean or null"}
        await bad.send(orjson.dumps({"id": "x", "device": "good", "data": {"k": 1}}).decode())
        error = await reply(bad)
        assert (error["reason"], error["ids"]) == ("forbidden_device", ["x"])
        # A mixed batch: the good message is still stored and acked.
        await bad.send(orjson.dumps([{"id": "y", "ts": "nope", "data": {"k": 1}},
                                     {"id": "z", "data": {"k": 2}}]).decode())
        first, second = await reply(bad), await reply(bad)
        assert (first["reason"], first["ids"]) == ("bad_ts", ["y"])
        assert second == {"type": "ack", "ids": ["z"]}
        await good.send(orjson.dumps({"id": 1, "data": {"k": 1}}).decode())
        assert await reply(good) == {"type": "ack", "ids": [1]}
        # Oversized frame: closed with 1009; the other device is untouched.
        await bad.send(orjson.dumps({"id": "big", "data": {"k": "x" * 4000}}).decode())
        with pytest.raises(ConnectionClosed) as closed:
            await reply(bad)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        await good.send(orjson.dumps({"id": 2, "data": {"k": 2}}).decode())
        assert await reply(good) == {"type": "ack", "ids": [2]}
    assert await middle.until(lambda m: len(m.stored) == 3, 5)
    assert middle.messages() == {("bad", "z"), ("good", "1"), ("good", "2")}


async def test_flood_gets_rate_limited_then_closed_1008(ingest: Factory,
                                                        middles: Factory) -> None:
    middle = middles()
    server = await ingest([middle], rate_limit=5, rate_burst=5, flood_limit=3)
    acked: list[int] = []
    limited: list[int] = []
    async with device_connect(server, "flooder") as ws, device_connect(server, "calm") as calm:
        for i in range(30):
            await ws.send(orjson.dumps({"id": i, "data": {"k": i}}).decode())
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                message = await reply(ws)
                if message["type"] == "ack":
                    acked.extend(message["ids"])
                else:
                    assert message["reason"] == "rate_limited"
                    assert message["retry_after_ms"] >= 1
                    limited.extend(message["ids"])
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        await calm.send(orjson.dumps({"id": "ok", "data": {"k": 1}}).decode())
        assert await reply(calm) == {"type": "ack", "ids": ["ok"]}
    assert acked == [0, 1, 2, 3, 4]
    assert limited == [5, 6, 7]
    assert await middle.until(lambda m: len(m.stored) == 6, 5)
    # Never ack-then-drop, never store a refused message.
    assert {m for d, m in middle.messages() if d == "flooder"} == {str(i) for i in acked}


async def test_slow_handshake_is_cut_off(ingest: Factory) -> None:
    server = await ingest(open_timeout=0.5)
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/ingest HTTP/1.1\r\nHost: x\r\n")  # ...and never finishes
        start = time.monotonic()
        data = await loop.run_in_executor(None, sock.recv, 1024)
        assert data == b""
        assert time.monotonic() - start < 4


async def test_silent_client_is_dropped_by_keepalive(ingest: Factory) -> None:
    server = await ingest(ping_interval=0.3, ping_timeout=0.3)
    token = issue_token(SECRET.encode(), "mute", DEVICE_AUDIENCE, 60)
    loop = asyncio.get_running_loop()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"GET /v1/ingest HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n"
        )
        received = b""
        start = time.monotonic()
        while True:  # read the 101, the pings we never answer, then EOF
            chunk = await loop.run_in_executor(None, sock.recv, 4096)
            if not chunk:
                break
            received += chunk
        assert received.startswith(b"HTTP/1.1 101")
        assert time.monotonic() - start < 4


async def test_queue_full_answers_busy_and_loses_nothing(ingest: Factory,
                                                         middles: Factory) -> None:
    silent = middles(mode="silent")
    server = await ingest([silent], queue_bytes=64 * 1024, busy_wait=0.1, busy_retry_ms=50,
                          forward_ack_timeout=30)
    acked: set[int] = set()
    busy: set[int] = set()
    payload = {"k": "x" * 200}
    async with device_connect(server, "dev-busy") as ws:
        msg_id = 0
        while not busy:
            msg_id += 1
            await ws.send(orjson.dumps({"id": msg_id, "data": payload}).decode())
            answer = await reply(ws)
            if answer["type"] == "ack":
                acked.update(answer["ids"])
            else:
                assert answer == {"type": "busy", "ids": [msg_id], "retry_after_ms": 50}
                busy.add(msg_id)
        assert msg_id < 1000
        assert server.queue is not None
        assert server.queue.depth().records == len(acked)
        # Pipelined frames into the full queue: every id gets exactly one answer.
        burst = list(range(msg_id + 1, msg_id + 31))
        for i in burst:
            await ws.send(orjson.dumps({"id": i, "data": payload}).decode())
        answered: list[int] = []
        while len(answered) < len(burst):
            answer = await reply(ws)
            answered.extend(answer["ids"])
            (acked if answer["type"] == "ack" else busy).update(answer["ids"])
        assert sorted(answered) == burst
    assert not (acked & busy)
    # Nothing acked was lost: the queue keeps every acked message until a middle takes it.
    stored = [decode_reading(r.payload) for r in server.queue.read(1, max_records=10_000)]
    assert {int(r.msg_id) for r in stored} == acked


async def test_failover_to_the_next_middle_resends_everything_unacked(
        ingest: Factory, middles: Factory, tmp_path: Path) -> None:
    from iotpipe.ingest.core import preferred_endpoint

    pair = [middles(), middles()]
    # Fix the queue's incarnation up front, so the test knows which middle is preferred.
    queue_dir = tmp_path / "q0" / "p0"
    queue_dir.mkdir(parents=True)
    (queue_dir / INCARNATION_FILE).write_text("0123456789abcdef\n")
    node = "test-node-p0~0123456789abcdef"
    preferred = preferred_endpoint(node, [m.endpoint for m in pair])
    a, b = pair[preferred], pair[1 - preferred]
    a.mode = "silent"  # before any traffic: the preferred middle never answers
    server = await ingest(pair, forward_ack_timeout=0.5)
    assert server.node == node
    async with device_connect(server, "dev-f") as ws:
        for i in range(20):
            await ws.send(orjson.dumps({"id": i, "data": {"k": i}}).decode())
            assert (await reply(ws))["type"] == "ack"
    assert await b.until(lambda m: len(m.stored) == 20, 10)
    assert a.batches, "the preferred (silent) middle got the batches first"
    assert b.messages() == {("dev-f", str(i)) for i in range(20)}
    # Sequence order per node is kept on the new middle: the first batch starts at 1.
    assert b.batches[0][1] == 1


async def test_busy_middle_is_retried_in_order(ingest: Factory, middles: Factory) -> None:
    middle = middles(mode="busy", busy_count=3)
    server = await ingest([middle])
    async with device_connect(server, "dev-b") as ws:
        for i in range(10):
            await ws.send(orjson.dumps({"id": i, "data": {"k": i}}).decode())
            assert (await reply(ws))["type"] == "ack"
    assert await middle.until(lambda m: len(m.stored) == 10, 10)
    assert middle.busy_sent == 3
    assert server.forwarder is not None and server.forwarder.core.stats.busy_replies >= 1


async def test_insecure_mode_takes_device_from_query_or_message(ingest: Factory,
                                                                middles: Factory) -> None:
    middle = middles()
    server = await ingest([middle], insecure_no_auth=True)
    async with connect(url(server, "?device=q-dev")) as ws:
        await ws.send(orjson.dumps({"id": 1, "data": {"k": 1}}).decode())
        assert await reply(ws) == {"type": "ack", "ids": [1]}
    async with connect(url(server)) as ws:
        await ws.send(orjson.dumps([{"id": 2, "device": "f-dev", "data": {"k": 1}},
                                    {"id": 3, "data": {"k": 1}}]).decode())
        assert (await reply(ws))["reason"] == "missing_device"
        assert await reply(ws) == {"type": "ack", "ids": [2]}
    assert await middle.until(lambda m: len(m.stored) == 2, 5)
    assert middle.messages() == {("q-dev", "1"), ("f-dev", "2")}


def test_queue_survives_reopen_with_forwarder_cursor(tmp_path: Path) -> None:
    # The forwarder consumer is registered at open, so depth counts unforwarded records.
    with PersistentQueue.open(tmp_path / "q", capacity_bytes=1 << 20,
                              consumers=("forwarder",)) as queue:
        queue.append([b"a", b"b"])
        assert queue.depth().records == 2


async def test_metrics_count_by_reason_without_per_message_labels(ingest: Factory) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from iotpipe.ingest.metrics import IngestCollector

    server = await ingest()
    async with device_connect(server, "dev-m") as ws:
        await ws.send("[]")
        await reply(ws)
        await ws.send(orjson.dumps([{"id": 1, "data": {"k": 1}}, {"id": 2, "data": 3}]))
        await reply(ws)
        await reply(ws)
        registry = CollectorRegistry()
        assert server.forwarder is not None
        registry.register(IngestCollector(server.counters, lambda: [server.forwarder.core]))
        text = generate_latest(registry).decode()
    assert "iotpipe_ingest_connections 1.0" in text
    assert "iotpipe_ingest_messages_accepted_total 1.0" in text
    assert 'iotpipe_ingest_messages_rejected_total{reason="empty_batch"} 1.0' in text
    assert 'iotpipe_ingest_messages_rejected_total{reason="bad_data"} 1.0' in text
    assert 'iotpipe_ingest_frame_messages_bucket{le="1"} 1.0' in text
    # One accepted frame, one ack: its latency (read to durable) is in the histogram.
    assert "iotpipe_ingest_ack_seconds_count 1.0" in text
    assert 'iotpipe_ingest_ack_seconds_bucket{le="+Inf"} 1.0' in text
    assert "iotpipe_forwarder_in_flight_records" in text
    assert "dev-m" not in text


async def test_drain_closes_devices_with_1001_at_a_bounded_rate(ingest: Factory,
                                                                middles: Factory) -> None:
    middle = middles()
    server = await ingest([middle], drain_close_rate=10, drain_timeout=20)
    loop = asyncio.get_running_loop()
    closed_at: list[float] = []
    codes: list[int] = []
    acked: list[int] = []
    all_acked = asyncio.Event()

    async def device(index: int) -> None:
        async with device_connect(server, f"dev-{index}") as ws:
            await ws.send(orjson.dumps({"id": index, "data": {"k": index}}).decode())
            assert (await reply(ws))["type"] == "ack"
            acked.append(index)
            if len(acked) == 5:
                all_acked.set()
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 15)
            assert closed.value.rcvd is not None
            codes.append(closed.value.rcvd.code)
            closed_at.append(loop.time())

    devices = [asyncio.create_task(device(i)) for i in range(5)]
    await asyncio.wait_for(all_acked.wait(), 10)
    assert server.ready()
    start = loop.time()
    assert await server.drain()
    assert not server.ready()
    await asyncio.gather(*devices)
    assert codes == [1001] * 5
    # 10 closes/s: five closes take at least 0.4 s from the first to the last.
    assert max(closed_at) - min(closed_at) >= 0.35
    assert min(closed_at) - start < 1.0
    with pytest.raises(OSError):
        async with device_connect(server, "late", open_timeout=2):
            pass
    assert await middle.until(lambda m: len(m.stored) == 5, 5)
    assert server.queue is not None and server.queue.depth().records == 0


async def test_queue_failure_is_never_acked_and_closes_1011(ingest: Factory) -> None:
    server = await ingest()
    async with device_connect(server, "dev-q") as ws:
        await ws.send(orjson.dumps({"id": "before", "data": {"k": 1}}).decode())
        assert await reply(ws) == {"type": "ack", "ids": ["before"]}
        assert server.forwarder is not None and server.queue is not None
        await asyncio.to_thread(server.forwarder.stop)
        server.queue.close()  # the disk is gone, as far as the server can tell
        await ws.send(orjson.dumps({"id": "after", "data": {"k": 1}}).decode())
        error = await reply(ws)
        assert (error["type"], error["reason"], error["ids"]) == ("error", "internal", ["after"])
        with pytest.raises(ConnectionClosed) as closed:
            await reply(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    assert server.counters.rejected["internal"] == 1
    assert server.counters.accepted == 1


@pytest.mark.parametrize("enabled", [False, True])
async def test_compression_is_off_unless_enabled(ingest: Factory, enabled: bool,
                                                 ws_core: str) -> None:
    # "auto" picks websockets for --compression (picows has no permessage-deflate).
    server = await ingest(compression=enabled, ws_core="auto" if enabled else ws_core)
    assert (server.front is None) is (enabled or ws_core == "websockets")
    token = issue_token(SECRET.encode(), "dev-z", DEVICE_AUDIENCE, 60)
    async with connect(url(server), additional_headers={"Authorization": f"Bearer {token}"},
                       compression="deflate") as ws:
        assert ws.response is not None
        negotiated = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ("permessage-deflate" in negotiated) is enabled
        await ws.send(orjson.dumps({"id": 1, "data": {"k": "x" * 200}}).decode())
        assert await reply(ws) == {"type": "ack", "ids": [1]}


def listener_backlog(server: IngestServer) -> int:
    """The accept queue size the kernel gave ingest's listener: for a listening socket
    TCP_INFO's ``tcpi_sacked`` field is sk_max_ack_backlog (what ``ss`` shows as Send-Q)."""
    front = server.front if server.front is not None else server.ws_front
    assert front is not None
    (listener,) = front.sockets
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    # 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked
    return int(struct.unpack_from("8B6I", info)[13])


@pytest.mark.parametrize("requested", [1234, None])
async def test_listener_gets_the_configured_backlog(ingest: Factory,
                                                    requested: int | None) -> None:
    # Default: far above asyncio's 100 (a fleet reconnecting at once overflows that and
    # waits for SYN retransmits), up to the kernel's net.core.somaxconn cap.
    overrides = {} if requested is None else {"listen_backlog": requested}
    server = await ingest(**overrides)
    expected, somaxconn = listen_backlog(server.settings.listen_backlog)
    if requested is None:
        assert somaxconn is not None and expected == min(65535, somaxconn) > 100
    else:
        assert expected == min(1234, somaxconn or 1234)
    assert listener_backlog(server) == expected
