"""A real ``iotpipe relay`` process fed by a PUB socket in the test, with real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import zmq
from support.ports import free_port
from support.processes import ProcessGroup
from support.relay import Relay, wait_http
from support.waiting import eventually, wait_for
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from iotpipe.auth import CLIENT_AUDIENCE, DEVICE_AUDIENCE, issue_token

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

async def recv_json(ws: ClientConnection, wait_s: float = 5.0) -> dict[str, object]:
    return orjson.loads(await asyncio.wait_for(ws.recv(), wait_s))


async def subscribe(ws: ClientConnection, **filters: list[str]) -> dict[str, object]:
    await ws.send(orjson.dumps({"op": "subscribe", **filters}).decode())
    reply = await recv_json(ws)
    assert reply["event"] == "subscribed", reply
    return reply


async def warm_up(relay: Relay, ws: ClientConnection) -> None:
    """PUB/SUB drops everything until the subscription reaches the publisher: wait for it."""
    await subscribe(ws, devices=["warmup"])
    deadline = time.monotonic() + 10
    seq = 0
    while time.monotonic() < deadline:
        seq += 1
        relay.publish("warmup", seq, source="warmup")
        try:
            frame = await recv_json(ws, wait_s=0.2)
        except TimeoutError:
            continue
        assert frame["device"] == "warmup"
        await ws.send('{"op":"unsubscribe","devices":["warmup"]}')
        # Drain warm-up readings still in flight until the unsubscribe confirmation.
        while (await recv_json(ws))["event"] != "unsubscribed":
            pass
        return
    raise AssertionError("relay never received from the test publisher")


@pytest.fixture
async def client(relay: Relay) -> AsyncIterator[ClientConnection]:
    async with connect(relay.url, additional_headers=relay.headers()) as ws:
        await warm_up(relay, ws)
        yield ws


async def test_handshake_rejects_missing_device_and_forged_tokens(relay: Relay) -> None:
    forged = issue_token(b"another-secret-of-32-bytes-or-more!", "app", CLIENT_AUDIENCE, 60)
    cases = [
        ({}, "missing"),
        ({"Authorization": f"Bearer {relay.token('dev-1', DEVICE_AUDIENCE)}"}, "wrong_audience"),
        ({"Authorization": "Bearer not.a.token"}, "malformed"),
        ({"Authorization": f"Bearer {forged}"}, "bad_signature"),
    ]
    for headers, reason in cases:
        with pytest.raises(InvalidStatus) as info:
            async with connect(relay.url, additional_headers=headers):
                pass
        assert info.value.response.status_code == 401
        assert info.value.response.body.decode().startswith(reason), info.value.response.body
    with pytest.raises(InvalidStatus) as info:
        async with connect(relay.url.replace("/v1/live", "/v1/other"),
                           additional_headers=relay.headers()):
            pass
    assert info.value.response.status_code == 404
    assert info.value.response.body.decode().startswith("not_found"), info.value.response.body
    # The live page shares the port: a plain GET of / is the page, a WebSocket handshake on
    # any path but /v1/live is still refused as above.
    page = await asyncio.to_thread(wait_http, relay.url.replace("ws://", "http://")
                                   .replace("/v1/live", "/"))
    assert "<title>iotpipe" in page
    with pytest.raises(InvalidStatus) as info:
        async with connect(relay.url.replace("/v1/live", "/"), additional_headers=relay.headers()):
            pass
    assert info.value.response.status_code == 404
    assert info.value.response.body.decode().startswith("not_found"), info.value.response.body
    # Browsers cannot set headers: the token is accepted as a query parameter too.
    async with connect(f"{relay.url}?token={relay.token()}") as ws:
        await subscribe(ws, devices=["x"])
    metrics = wait_http(relay.metrics + "/metrics")
    assert 'iotpipe_relay_rejected_connections_total{reason="wrong_audience"} 1.0' in metrics


async def test_filters_and_order(relay: Relay, client: ClientConnection) -> None:
    async with connect(relay.url, additional_headers=relay.headers("b")) as by_class:
        await subscribe(by_class, classes=["thermometer"], locations=["hall-1"])
        await subscribe(client, devices=["d-7"], prefixes=["therm-"])
        devices = ["d-7", "d-8", "therm-a", "boiler-1", "other", "therm-b"]
        for seq in range(1, 61):
            relay.publish(devices[seq % len(devices)], seq)
        got_client = [await recv_json(client) for _ in range(30)]
        got_class = [await recv_json(by_class) for _ in range(30)]
    wanted_client = [s for s in range(1, 61) if devices[s % 6] in ("d-7", "therm-a", "therm-b")]
    assert [f["seq"] for f in got_client] == wanted_client
    wanted_class = [s for s in range(1, 61) if devices[s % 6] in ("therm-a", "therm-b",
                                                                   "boiler-1")]
    assert [f["seq"] for f in got_class] == wanted_class
    first = got_client[0]
    assert first["event"] == "reading" and first["source"] == "m0"
    assert first["data"] == {"v": 1} and first["id"] == f"{first['device']}/{first['seq']}"


@pytest.mark.parametrize("relay", [["--compression"]], indirect=True)
async def test_compressed_clients_get_the_same_frames_through_websockets_send_path(
        relay: Relay, client: ClientConnection) -> None:
    # With --compression frames are not written pre-framed: each connection keeps deflate.
    assert [e.name for e in client.protocol.extensions] == ["permessage-deflate"]
    async with connect(relay.url, additional_headers=relay.headers("plain"),
                       compression=None) as plain:
        await subscribe(plain, prefixes=["d-"])
        await subscribe(client, prefixes=["d-"])
        got: dict[ClientConnection, list[int]] = {client: [], plain: []}
        for seq in range(1, 201):
            relay.publish(f"d-{seq % 3}", seq, data=b'{"blob":"' + b"y" * 300 + b'"}')
            if seq % 20 == 0:  # read as we go: the fixture's client queue holds 50
                for ws, seqs in got.items():
                    seqs += [await reading_seq(ws) for _ in range(20)]
        assert got[client] == got[plain] == list(range(1, 201))
        await client.send(b"\x00")
        assert (await recv_json(client))["reason"] == "binary_not_supported"


async def test_bad_frames_get_errors_and_connection_continues(relay: Relay,
                                                              client: ClientConnection) -> None:
    await client.send("{nope")
    assert (await recv_json(client))["reason"] == "bad_json"
    await client.send(b"\x00\x01")
    assert (await recv_json(client))["reason"] == "binary_not_supported"
    await client.send('{"op":"subscribe","rooms":["a"]}')
    assert (await recv_json(client))["reason"] == "bad_field"
    await subscribe(client, devices=["ok"])
    relay.publish("ok", 1)
    assert (await recv_json(client))["device"] == "ok"
    # An oversized frame closes the connection with 1009.
    await client.send('{"op":"subscribe","devices":["' + "x" * 70_000 + '"]}')
    with pytest.raises(ConnectionClosed) as info:
        await recv_json(client)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


async def test_upstream_gap_is_reported(relay: Relay, client: ClientConnection) -> None:
    await subscribe(client, devices=["g"])
    for seq in (1, 2, 5, 6):
        relay.publish("g", seq, source="mid-x")
    frames = [await recv_json(client) for _ in range(5)]
    assert [f.get("seq") for f in frames[:2]] == [1, 2]
    assert frames[2] == {"event": "gap", "reason": "upstream", "source": "mid-x", "missed": 2,
                         "from_seq": 3, "to_seq": 4}
    assert [f.get("seq") for f in frames[3:]] == [5, 6]


async def reading_seq(ws: ClientConnection) -> int:
    frame = await recv_json(ws)
    assert frame["event"] == "reading", frame
    return int(frame["seq"])  # type: ignore[call-overload]


def raw_ws_client(url_port: int, token: str) -> socket.socket:
    """A client that completes the handshake and then never reads a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.settimeout(5)
    sock.connect(("127.0.0.1", url_port))
    sock.sendall(
        b"GET /v1/live HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    # A masked text frame subscribing to everything this test publishes.
    payload = b'{"op":"subscribe","prefixes":["s"]}'
    mask = b"\x01\x02\x03\x04"
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
                 + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


async def test_client_that_never_reads_is_dropped_and_others_get_everything(
        relay: Relay, client: ClientConnection) -> None:
    port = int(relay.url.split(":")[2].split("/")[0])
    stuck = raw_ws_client(port, relay.token("stuck"))
    try:
        await subscribe(client, prefixes=["s"])
        received: list[int] = []
        big = b'{"blob":"' + b"x" * 2000 + b'"}'
        for seq in range(1, 3001):
            relay.publish("s1", seq, data=big)
            if seq % 10 == 0:
                # Read as we go, like a healthy app; the stuck one never reads.
                while len(received) < seq - 20:
                    received.append(await reading_seq(client))
        while len(received) < 3000:
            received.append(await reading_seq(client))
        assert received == list(range(1, 3001))
        metrics = wait_http(relay.metrics + "/metrics")
        dropped = [line for line in metrics.splitlines()
                   if line.startswith("iotpipe_relay_dropped_total")]
        assert dropped and float(dropped[0].split()[-1]) > 0, dropped
        # After the stall timeout (2 s) the stuck client is disconnected.
        def clients() -> str:
            return next(line for line in wait_http(relay.metrics + "/metrics").splitlines()
                        if line.startswith("iotpipe_relay_clients "))

        await eventually(lambda: clients().endswith(" 1.0"), 15, "one client left",
                         interval=0.2, details=clients)
        metrics = wait_http(relay.metrics + "/metrics")
        assert "closing slow client" in relay.procs.log("relay")
        assert "iotpipe_relay_slow_closes_total 1.0" in metrics
        sent = next(line for line in metrics.splitlines()
                    if line.startswith("iotpipe_relay_frames_sent_total"))
        assert float(sent.split()[-1]) >= 3000
    finally:
        stuck.close()


async def test_sigterm_closes_clients_with_going_away(relay: Relay,
                                                      client: ClientConnection) -> None:
    import signal

    proc = relay.procs._procs[0]
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(ConnectionClosed) as info:
        await recv_json(client, wait_s=10)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert proc.wait(timeout=10) == 0


async def test_class_subscription_follows_registry_changes(relay: Relay,
                                                           client: ClientConnection) -> None:
    await subscribe(client, classes=["pump"])
    relay.publish("p-1", 1)
    relay.publish("boiler-1", 2)
    # p-1 is unknown and boiler-1 is a boiler: nothing matches "pump" yet. Reclassify both;
    # the relay's registry watcher picks the file up within its interval (2 s).
    text = "devices:\n  boiler-1: {class: pump}\nprefixes:\n  p-: {class: pump}\n"
    tmp = relay.registry.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(relay.registry)
    deadline = time.monotonic() + 10
    seq = 2
    got: list[dict[str, object]] = []
    while time.monotonic() < deadline and len(got) < 2:
        seq += 1
        relay.publish("p-1" if seq % 2 else "boiler-1", seq)
        with contextlib.suppress(TimeoutError):
            while len(got) < 2:
                got.append(await recv_json(client, wait_s=0.3))
    assert {f["device"] for f in got} == {"p-1", "boiler-1"}, got
    assert all(f["seq"] > 2 for f in got)  # nothing from before the change


@pytest.mark.parametrize("relay", [["--max-clients", "1"]], indirect=True)
async def test_too_many_clients_get_503(relay: Relay, client: ClientConnection) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(relay.url, additional_headers=relay.headers("second")):
            pass
    assert info.value.response.status_code == 503
    assert info.value.response.body.startswith(b"too_many_clients")


@pytest.mark.parametrize("relay", [["--insecure-no-auth"]], indirect=True)
async def test_insecure_mode_accepts_clients_without_token(relay: Relay) -> None:
    async with connect(relay.url + "?client=dashboard") as ws:
        await warm_up(relay, ws)
        await subscribe(ws, devices=["d"])
        relay.publish("d", 1)
        assert (await recv_json(ws))["device"] == "d"


def readyz_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_ready_only_while_a_middle_is_connected(procs: ProcessGroup, tmp_path: Path) -> None:
    pub_port, port, metrics_port = free_port(), free_port(), free_port()
    procs.iotpipe(
        "relay", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
        "--middle-pub-endpoints", f"tcp://127.0.0.1:{pub_port}", "--insecure-no-auth",
        "--registry-file", str(tmp_path / "none.yaml"), name="relay")
    readyz = f"http://127.0.0.1:{metrics_port}/readyz"
    wait_http(f"http://127.0.0.1:{metrics_port}/healthz")
    time.sleep(0.5)
    assert readyz_status(readyz) == 503  # serving, but no middle to relay from

    def wait_status(expected: int) -> None:
        wait_for(lambda: readyz_status(readyz) == expected, 15, f"/readyz to answer {expected}",
                 interval=0.1)

    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    try:
        pub.bind(f"tcp://127.0.0.1:{pub_port}")
        wait_status(200)
        pub.close(0)
        wait_status(503)  # the middle went away
    finally:
        pub.close(0)
        context.term()
