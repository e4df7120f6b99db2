"""Real ``iotpipe ingest`` and ``iotpipe relay`` processes at the edge: devices over wss://
with a test certificate swapped while they are connected, and revocation through the deny
list (refused at the handshake, open connections closed within the reload interval, others
unaffected)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from support import waiting
from support.certs import make_cert
from support.ports import free_port
from support.processes import ProcessGroup
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from iotpipe.auth import CLIENT_AUDIENCE, DEVICE_AUDIENCE, issue_token, verify_identity
from iotpipe.wire import KIND_BATCH, decode_batch, decode_reading, encode_ack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SECRET = "edge-test-secret-at-least-32-bytes-long!"
ENV = {"IOTPIPE_AUTH_SECRET": SECRET}


class AckingMiddle:
    """A ROUTER in a thread that stores and acks every batch (plain ZeroMQ)."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stored: set[tuple[str, str]] = set()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            ident, *body = self.sock.recv_multipart()
            if body and body[0] == KIND_BATCH:
                batch = decode_batch(body)
                with self.lock:
                    for raw in batch.readings:
                        r = decode_reading(raw)
                        self.stored.add((r.device_id, r.msg_id))
                self.sock.send_multipart([ident, *encode_ack(batch.node, batch.last)])

    def has(self, pairs: set[tuple[str, str]]) -> bool:
        with self.lock:
            return pairs <= self.stored

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def middle() -> Iterator[AckingMiddle]:
    m = AckingMiddle()
    yield m
    m.close()


def wait_ready(procs: ProcessGroup, name: str, metrics_port: int) -> None:
    waiting.wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", 30, what=f"{name} ready",
                       details=lambda: procs.log(name))


def start_ingest(procs: ProcessGroup, tmp_path: Path, middle: AckingMiddle, *extra: str
                 ) -> int:
    port, metrics_port = free_port(), free_port()
    procs.iotpipe("ingest", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                  str(metrics_port), "--data-dir", str(tmp_path / "q"), "--node-id", "node",
                  "--middle-endpoints", middle.endpoint, *extra, name="ingest", env=ENV)
    wait_ready(procs, "ingest", metrics_port)
    return port


def device_token(device: str) -> str:
    return issue_token(SECRET.encode(), device, DEVICE_AUDIENCE, 600)


class Device:
    """One device connection: sends numbered messages and waits for each ack."""

    def __init__(self, ws: ClientConnection, device: str) -> None:
        self.ws, self.device, self.next_id = ws, device, 1
        self.acked: set[tuple[str, str]] = set()

    async def send_one(self) -> None:
        msg_id = self.next_id
        self.next_id += 1
        await self.ws.send(json.dumps({"id": msg_id, "ts": time.time(), "data": {"v": 1}}))
        reply = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        assert reply == {"type": "ack", "ids": [msg_id]}, reply
        self.acked.add((self.device, str(msg_id)))

    def served_cn(self) -> str:
        sslobj = self.ws.transport.get_extra_info("ssl_object")
        return dict(x[0] for x in sslobj.getpeercert()["subject"])["commonName"]


async def open_device(url: str, device: str, token: str | None = None,
                      ssl_ctx: ssl.SSLContext | None = None) -> Device:
    ws = await connect(url, ssl=ssl_ctx, open_timeout=10,
                       additional_headers={"Authorization":
                                           f"Bearer {token or device_token(device)}"})
    return Device(ws, device)


def trust(*cas: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cadata="".join(ca.read_text() for ca in cas))
    return ctx


def install_cert(tmp_path: Path, cert: Path, key: Path, cn: str) -> Path:
    """Replace cert/key the way a Secret volume update does (new files, then a rename):
    returns the CA file clients need to trust the new certificate."""
    staging = tmp_path / f"staging-{cn}"
    staging.mkdir()
    ca = tmp_path / f"ca-{cn}.pem"
    make_cert(staging / "tls.crt", staging / "tls.key", cn, ca_out=ca)
    os.replace(staging / "tls.key", key)
    os.replace(staging / "tls.crt", cert)
    shutil.rmtree(staging)
    return ca


async def test_devices_over_wss_and_a_certificate_swap_while_connected(
        procs: ProcessGroup, tmp_path: Path, middle: AckingMiddle) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca1 = install_cert(tmp_path, cert, key, "first")
    port = start_ingest(procs, tmp_path, middle, "--tls-cert", str(cert), "--tls-key",
                        str(key), "--tls-reload-seconds", "0.2")
    url = f"wss://localhost:{port}/v1/ingest"
    devices = [await open_device(url, f"dev-{i}", ssl_ctx=trust(ca1)) for i in range(3)]
    for d in devices:
        await d.send_one()
        assert d.served_cn() == "first"
    # Plain ws:// to a TLS port gets no WebSocket.
    with pytest.raises((InvalidMessage, ConnectionError, OSError, asyncio.TimeoutError)):
        await connect(f"ws://127.0.0.1:{port}/v1/ingest", open_timeout=5,
                      additional_headers={"Authorization": f"Bearer {device_token('x')}"})
    # A client that does not trust the certificate is refused by TLS itself.
    with pytest.raises(ssl.SSLCertVerificationError):
        await open_device(url, "dev-x", ssl_ctx=ssl.create_default_context())

    ca2 = install_cert(tmp_path, cert, key, "second")
    both = trust(ca1, ca2)
    deadline = time.monotonic() + 20
    while True:  # new connections get the new certificate once the tier reloaded it
        fresh = await open_device(url, "dev-new", ssl_ctx=both)
        if fresh.served_cn() == "second":
            break
        await fresh.ws.close()
        assert time.monotonic() < deadline, "the new certificate was never served"
        await asyncio.sleep(0.1)
    await fresh.send_one()
    # Devices connected before the swap carry on, on their session.
    for d in devices:
        for _ in range(3):
            await d.send_one()
        assert d.served_cn() == "first"
    # A client trusting only the new CA now connects; one trusting only the old one cannot.
    await (await open_device(url, "dev-ca2", ssl_ctx=trust(ca2))).send_one()
    with pytest.raises(ssl.SSLCertVerificationError):
        await open_device(url, "dev-ca1", ssl_ctx=trust(ca1))
    acked = set().union(*(d.acked for d in devices), fresh.acked)
    await asyncio.to_thread(waiting.wait_for, lambda: middle.has(acked), 20,
                            "the middle to hold every acked message")
    for d in [*devices, fresh]:
        await d.ws.close()


async def closed_with(device: Device, within: float) -> tuple[int | None, str | None]:
    """Wait (bounded) for the server to close ``device``; its close code and reason."""
    try:
        await asyncio.wait_for(device.ws.wait_closed(), within)
    except TimeoutError:
        raise AssertionError(f"{device.device} was not closed within {within}s") from None
    return device.ws.close_code, device.ws.close_reason


async def test_revoked_devices_refused_and_closed_others_unaffected(
        procs: ProcessGroup, tmp_path: Path, middle: AckingMiddle) -> None:
    deny = tmp_path / "deny.yaml"
    deny.write_text("devices: []\n")
    reload_s = 0.5
    port = start_ingest(procs, tmp_path, middle, "--deny-list-file", str(deny),
                        "--deny-list-reload-seconds", str(reload_s))
    url = f"ws://127.0.0.1:{port}/v1/ingest"
    by_device = await open_device(url, "dev-bad")
    stolen_token = device_token("dev-shared")
    by_token = await open_device(url, "dev-shared", token=stolen_token)
    good = await open_device(url, "dev-good")
    other_token = await open_device(url, "dev-shared")  # same device, another token
    for d in (by_device, by_token, good, other_token):
        await d.send_one()
    jti = verify_identity(SECRET.encode(), stolen_token, DEVICE_AUDIENCE).token_id
    assert jti

    deny.write_text(f"devices: [dev-bad]\ntoken_ids: [{jti}]\n")
    revoked_at = time.monotonic()
    # Within the reload interval (plus scheduling slack on a loaded machine).
    assert await closed_with(by_device, reload_s + 5) == (1008, "revoked: device")
    assert await closed_with(by_token, reload_s + 5) == (1008, "revoked: token")
    assert time.monotonic() - revoked_at < reload_s + 5
    # Others carry on, including the same device on a token that was not revoked.
    for d in (good, other_token):
        for _ in range(5):
            await d.send_one()
    # New handshakes: refused with 403 naming the reason.
    for device, token in (("dev-bad", None), ("dev-shared", stolen_token)):
        with pytest.raises(InvalidStatus) as refused:
            await open_device(url, device, token=token)
        assert refused.value.response.status_code == 403
        assert b"revoked" in refused.value.response.body
    fresh = await open_device(url, "dev-shared")
    await fresh.send_one()
    # Un-revoking lets the device back in.
    deny.write_text("devices: []\n")
    deadline = time.monotonic() + reload_s + 10
    while True:
        try:
            back = await open_device(url, "dev-bad")
            break
        except InvalidStatus:
            assert time.monotonic() < deadline, "dev-bad stayed refused after un-revoking"
            await asyncio.sleep(0.1)
    await back.send_one()
    acked = set().union(*(d.acked for d in (by_device, by_token, good, other_token, fresh,
                                            back)))
    await asyncio.to_thread(waiting.wait_for, lambda: middle.has(acked), 20,
                            "the middle to hold every acked message")
    for d in (good, other_token, fresh, back):
        await d.ws.close()
    with pytest.raises(ConnectionClosed):
        await by_device.ws.send("{}")


async def test_relay_over_wss_revokes_a_client(procs: ProcessGroup, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    ca = install_cert(tmp_path, cert, key, "relay")
    deny = tmp_path / "deny.yaml"
    deny.write_text("clients: []\n")
    port, metrics_port = free_port(), free_port()
    procs.iotpipe("relay", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                  str(metrics_port), "--registry-file", str(tmp_path / "none.yaml"),
                  "--tls-cert", str(cert), "--tls-key", str(key),
                  "--deny-list-file", str(deny), "--deny-list-reload-seconds", "0.3",
                  name="relay", env=ENV)
    wait_ready(procs, "relay", metrics_port)
    url = f"wss://localhost:{port}/v1/live"

    async def client(app: str) -> ClientConnection:
        token = issue_token(SECRET.encode(), app, CLIENT_AUDIENCE, 600)
        return await connect(url, ssl=trust(ca), open_timeout=10,
                             additional_headers={"Authorization": f"Bearer {token}"})

    revoked, kept = await client("app-old"), await client("app-ok")
    deny.write_text("clients: [app-old]\n")
    await asyncio.wait_for(revoked.wait_closed(), 10)
    assert (revoked.close_code, revoked.close_reason) == (1008, "revoked: client")
    with pytest.raises(InvalidStatus) as refused:
        await client("app-old")
    assert refused.value.response.status_code == 403
    # The other client's connection is still open and answers a subscription.
    await kept.send(json.dumps({"op": "subscribe", "devices": ["d1"]}))
    reply = json.loads(await asyncio.wait_for(kept.recv(), 10))
    assert reply.get("event") != "error", reply
    assert kept.close_code is None
    await kept.close()


def test_bad_security_settings_exit_2_naming_the_option(tmp_path: Path) -> None:
    (tmp_path / "deny.yaml").write_text("devices: dev-1\n")
    cases = [
        (["--tls-cert", str(tmp_path / "missing.crt")], "--tls-cert and --tls-key go together"),
        (["--tls-cert", str(tmp_path / "c"), "--tls-key", str(tmp_path / "k")], "not found"),
        (["--deny-list-file", str(tmp_path / "deny.yaml")], "must be a list"),
        (["--curve-keys-dir", str(tmp_path / "nokeys")], "--curve-keys-dir"),
    ]
    tiers = {
        "ingest": ["--middle-endpoints", "tcp://127.0.0.1:1", "--data-dir", str(tmp_path / "q")],
        "relay": ["--middle-pub-endpoints", "tcp://127.0.0.1:1"],
    }
    for tier, args in tiers.items():
        for extra, problem in cases:
            out = subprocess.run(
                [sys.executable, "-m", "iotpipe.cli", tier, *args, *extra],
                capture_output=True, text=True, timeout=60, env={**os.environ, **ENV})
            assert out.returncode == 2, (tier, extra, out.stderr)
            assert problem in out.stderr, (tier, extra, out.stderr)
