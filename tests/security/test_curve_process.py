"""A real ``iotpipe middle`` with CurveZMQ: only the pipeline's tiers get in, on their own
socket; refusals are logged once; a full key rotation under load loses no acked message."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from support.ports import free_port
from support.processes import ProcessGroup
from support.waiting import wait_for

from iotpipe import curve, wire
from iotpipe_tools.simulate import SimulateSettings, run_simulation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SECRET = "curve-test-secret-at-least-32-bytes-long"
ENV = {"IOTPIPE_AUTH_SECRET": SECRET}


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


class Middle:
    def __init__(self, procs: ProcessGroup, data_dir: Path, keys: Path) -> None:
        self.procs, self.data_dir, self.keys = procs, data_dir, keys
        self.router_port, self.pub_port, self.feed_port = free_port(), free_port(), free_port()
        self.metrics_port = free_port()
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.starts += 1
        self.proc = self.procs.iotpipe(
            "middle", "--host", "127.0.0.1", "--router-port", str(self.router_port),
            "--pub-port", str(self.pub_port), "--feed-port", str(self.feed_port),
            "--metrics-port", str(self.metrics_port), "--data-dir", str(self.data_dir),
            "--middle-id", "mid-0", "--curve-keys-dir", str(self.keys),
            "--curve-reload-seconds", "0.2", name=self.name)
        wait_for(lambda: http_get(self.url("/readyz"))[0] == 200, 30,
                   f"middle ready:\n{self.log()}")

    @property
    def name(self) -> str:
        return f"middle-{self.starts}"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def log(self) -> str:
        return self.procs.log(self.name)

    def metric(self, name: str, labels: str = "") -> float:
        text = http_get(self.url("/metrics"))[1]
        match = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def log_lines(self, message: str) -> list[dict[str, object]]:
        lines = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("msg", entry.get("message")) == message:
                    lines.append(entry)
        return lines

    def stop(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        assert self.proc.wait(20) == 0, self.log()


def reading(device: str, n: int) -> bytes:
    return wire.encode_reading(device, f"{device}/{n}", n, b'{"v":%d}' % n, n)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def socket_as(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, port: int,
              who: curve.CurveKeys | str) -> zmq.Socket[bytes]:
    """A client socket: a role's keys, "plain" (no CURVE) or "stranger" (a key pair of its
    own, knowing the middle's public key, which is public)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.reconnect_ivl = 20  # retry often: the refusal must still be logged only once
    if isinstance(who, curve.CurveKeys):
        curve.secure_client(sock, who)
    elif who == "stranger":
        public, secret = zmq.curve_keypair()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = STRANGER_SERVER_KEY[0]
    if kind == zmq.SUB:
        sock.subscribe(b"")
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


STRANGER_SERVER_KEY: list[bytes] = []


def test_only_the_pipelines_tiers_get_in(procs: ProcessGroup, tmp_path: Path,
                                         ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    keys_dir = tmp_path / "keys"
    curve.generate_keys(keys_dir)
    role = {r: curve.load_keys(keys_dir, r) for r in curve.ROLES}
    STRANGER_SERVER_KEY[:] = [role["middle"].own.public]
    middle = Middle(procs, tmp_path / "log", keys_dir)
    middle.start()

    # Intruders on every port: no CURVE, a key of their own, and a real tier key used on
    # a socket that does not admit that tier.
    intruders = {
        "router": [socket_as(ctx, zmq.DEALER, middle.router_port, w)
                   for w in ("plain", "stranger", role["storage"])],
        "pub": [socket_as(ctx, zmq.SUB, middle.pub_port, w)
                for w in ("plain", "stranger", role["ingest"])],
        "feed": [socket_as(ctx, zmq.DEALER, middle.feed_port, w)
                 for w in ("plain", "stranger", role["relay"])],
    }
    for n, sock in enumerate(intruders["router"]):
        for first in range(1, 50, 10):  # well-formed batches, as an ingest node would send
            sock.send_multipart(wire.encode_batch(f"evil{n}", first,
                                                  [reading("victim", first + i)
                                                   for i in range(10)]), zmq.NOBLOCK)
    for n, sock in enumerate(intruders["feed"]):
        sock.send_multipart(wire.encode_feed_request("storage", f"thief{n}", 10_000, []),
                            zmq.NOBLOCK)

    # The pipeline's own tiers: ingest stores, relay hears, storage consumes.
    ingest = socket_as(ctx, zmq.DEALER, middle.router_port, role["ingest"])
    relay = socket_as(ctx, zmq.SUB, middle.pub_port, role["relay"])
    storage = socket_as(ctx, zmq.DEALER, middle.feed_port, role["storage"])
    first, heard = 1, None
    deadline = time.monotonic() + 30
    while heard is None:  # batches until the relay's subscription is live and hears one
        assert time.monotonic() < deadline, middle.log()
        ingest.send_multipart(wire.encode_batch("node-1", first, [reading("dev", first)]))
        assert ingest.poll(10_000), "the ingest key got no ack"
        assert wire.decode_ack(ingest.recv_multipart()) == wire.Ack("node-1", first)
        first += 1
        if relay.poll(200):
            heard = wire.decode_live(relay.recv_multipart())
    assert heard.device_id == "dev"
    stored = first - 1
    storage.send_multipart(wire.encode_feed_request("storage", "s1", 10_000, []))
    assert storage.poll(10_000), "the storage key got no delivery"
    records = wire.decode_records(storage.recv_multipart())
    nodes = {wire.decode_log_record(r).node for r in records.records}
    assert nodes == {"node-1"} and len(records.records) == stored

    # Every intruder handshake was refused (and retried): wait for the counters, then check
    # that nothing reached or left through an intruder.
    def refused(sock_name: str, reason: str) -> float:
        return middle.metric("iotpipe_middle_refused_handshakes_total",
                             f'{{reason="{reason}",socket="{sock_name}"}}')

    for sock_name in ("router", "pub", "feed"):
        wait_for(lambda s=sock_name: refused(s, "key") >= 2
                   and refused(s, "no_curve") + refused(s, "broken") >= 1,
                   20, f"refusals on {sock_name}")
    for sock_name, socks in intruders.items():
        for sock in socks:
            assert not sock.poll(0), f"an intruder on {sock_name} received something"
    assert middle.metric("iotpipe_middle_records_total") == stored
    assert middle.metric("iotpipe_middle_batches_total") == stored

    # Logged once per refused key and socket (ZAP), once per socket for keyless clients.
    key_lines = middle.log_lines("CURVE client refused: its public key is not one of this "
                                 "pipeline's")
    per_socket = sorted(str(e["socket"]) for e in key_lines)
    assert per_socket == ["feed", "feed", "pub", "pub", "router", "router"], middle.log()
    plain_lines = middle.log_lines("ZeroMQ handshake refused")
    assert sorted(str(e["socket"]) for e in plain_lines) == ["feed", "pub", "router"], \
        middle.log()
    middle.stop()


def test_middle_metrics_name_the_keys_it_admits_and_runs_with(procs: ProcessGroup,
                                                               tmp_path: Path) -> None:
    """What the operator's rotation waits on (parsed with the operator's own parser)."""
    from iotpipe_operator.rotation import parse_middle, public_fingerprints

    keys = tmp_path / "keys"
    curve.generate_keys(keys)
    middle = Middle(procs, tmp_path / "log", keys)
    middle.start()

    def seen() -> tuple[object, dict[str, str], dict[str, str]]:
        files = {p.name: p.read_bytes() for p in keys.iterdir() if p.is_file()}
        return (parse_middle(http_get(middle.url("/metrics"))[1]),
                public_fingerprints(files, "current"), public_fingerprints(files, "next"))

    state, current, _ = seen()
    assert state is not None and state.own == state.disk == current["middle"]
    assert state.admitted == {"router": {current["ingest"]}, "pub": {current["relay"]},
                              "feed": {current["storage"]}}
    curve.add_next(keys)
    _, _, nxt = seen()
    wait_for(lambda: (s := seen()[0]) is not None
               and s.admitted["router"] == {current["ingest"], nxt["ingest"]}
               and s.admitted["feed"] == {current["storage"], nxt["storage"]}, 30,
               "next keys admitted")
    curve.promote(keys)
    # the promoted own key is on disk; the middle runs with the old one until a restart
    wait_for(lambda: (s := seen()[0]) is not None and s.disk == nxt["middle"], 30,
               "promoted key seen on disk")
    state = seen()[0]
    assert state is not None and state.own == current["middle"]
    middle.stop()
    middle.start()
    state = seen()[0]
    assert state is not None and state.own == state.disk == nxt["middle"]
    middle.stop()


def test_middle_refuses_to_start_without_usable_keys(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "middle", "--host", "127.0.0.1",
         "--metrics-port", "0", "--data-dir", str(tmp_path / "log"),
         "--curve-keys-dir", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "CURVE keys directory does not exist" in out.stderr


async def test_key_rotation_under_load_loses_no_acked_message(procs: ProcessGroup,
                                                              tmp_path: Path) -> None:
    """All three rotation steps for every role, with devices sending throughout: the middle
    admits old+new client keys, ingest restarts on its new key, the middle and ingest
    restart on the new middle key, old keys are retired; every acked message is stored."""
    keys_dir = tmp_path / "keys"
    curve.generate_keys(keys_dir)
    middle = Middle(procs, tmp_path / "log", keys_dir)
    middle.start()
    port, metrics_port = free_port(), free_port()
    ingest_args = (
        "ingest", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
        str(metrics_port), "--data-dir", str(tmp_path / "q"), "--node-id", "node",
        "--middle-endpoints", f"tcp://127.0.0.1:{middle.router_port}", "--rate-limit", "0",
        "--forward-ack-timeout", "1", "--curve-keys-dir", str(keys_dir))
    starts = 0

    def start_ingest() -> subprocess.Popen[bytes]:
        nonlocal starts
        starts += 1
        proc = procs.iotpipe(*ingest_args, name=f"ingest-{starts}", env=ENV)
        wait_for(lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200,
                   30, f"ingest ready:\n{procs.log(f'ingest-{starts}')}")
        return proc

    def forwarded() -> float:
        return middle.metric("iotpipe_middle_records_total")

    ingest = start_ingest()
    sim = asyncio.create_task(run_simulation(SimulateSettings(  # type: ignore[call-arg]
        url=f"ws://127.0.0.1:{port}/v1/ingest", secret=SECRET, connections=5, rate=40,
        batch=2, reconnect=True, duration=30, messages=600, ack_timeout=30)))

    async def progress(what: str) -> None:
        """Wait until the middle stores more than it had: the pipeline moves again."""
        before = await asyncio.to_thread(forwarded)
        await asyncio.to_thread(wait_for, lambda: forwarded() > before + 20, 30, what)

    await progress("first records")
    assert curve.add_next(keys_dir) == list(curve.ROLES)        # step 1
    await asyncio.sleep(0.5)  # > --curve-reload-seconds: the middle admits both keys
    await progress("records after adding next keys")
    curve.promote(keys_dir)                                       # step 2
    os.killpg(ingest.pid, signal.SIGKILL)  # acked messages sit in its durable queue
    ingest.wait(10)
    await asyncio.sleep(0.3)
    ingest = start_ingest()
    # The middle's own key changed too: until it restarts, the new ingest cannot reach it.
    middle.stop()
    middle.start()
    await progress("records on the new keys")
    curve.retire(keys_dir)                                        # step 3
    await asyncio.sleep(0.5)
    await progress("records after retiring the old keys")
    report = await sim
    assert report.acked == 3000, report.to_dict()

    # Every acked message reached the middle's log: read it back as storage (new key).
    expected = {(d, str(i)) for d, ids in report.acked_ids.items() for i in ids}
    got: set[tuple[str, str]] = set()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        storage = ctx.socket(zmq.DEALER)
        storage.linger = 0
        curve.secure_client(storage, curve.load_keys(keys_dir, "storage"))
        storage.connect(f"tcp://127.0.0.1:{middle.feed_port}")
        deadline = time.monotonic() + 60
        acks: list[tuple[int, int]] = []
        while not expected <= got and time.monotonic() < deadline:
            storage.send_multipart(wire.encode_feed_request("storage", "check", 5000, acks))
            acks = []
            if not storage.poll(1000):
                continue
            records = wire.decode_records(storage.recv_multipart())
            for raw in records.records:
                r = wire.decode_reading(wire.decode_log_record(raw).reading)
                got.add((r.device_id, r.msg_id))
            acks = [(records.first, records.first + len(records.records) - 1)]
    finally:
        ctx.destroy(linger=0)
    missing = expected - got
    assert not missing, f"{len(missing)} acked messages not stored, e.g. {sorted(missing)[:5]}"
