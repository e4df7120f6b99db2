"""End-to-end test support: the four tiers as real processes, a device fleet, live clients.

The fleet is written here (not ``iotpipe simulate``) where a test needs full control over
resends: a device that loses its connection resends every unacknowledged message with the
SAME id, as real firmware does, so storage's (device_id, msg_id) identity is exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import resource
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from conftest import ProcessGroup, free_port
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from iotpipe.auth import CLIENT_AUDIENCE, DEVICE_AUDIENCE, issue_token

SECRET = "integration-secret-0123456789abcdef0123456789"

REGISTRY_YAML = """\
devices:
  dev-000: {class: boiler, location: hall-1, labels: {line: "1"}}
prefixes:
  dev-: {class: thermometer, location: hall-2}
"""


async def eventually(predicate: Callable[[], bool], within_s: float,
                     interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it holds or ``within_s`` seconds pass; returns its last value."""
    deadline = time.monotonic() + within_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


def raise_nofile(wanted: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def metric_value(text: str, name: str) -> float | None:
    """The value of an unlabelled sample, or the sum over labelled ones."""
    total: float | None = None
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Pipeline:
    """The four tiers on loopback ports, each a separate process that tests may kill."""

    procs: ProcessGroup
    root: Path
    ingest_args: list[str] = field(default_factory=list)
    middle_args: list[str] = field(default_factory=list)
    relay_args: list[str] = field(default_factory=list)
    storage_args: list[str] = field(default_factory=list)
    middles: int = 1  # tiers "middle" (id mid-0), "middle1" (mid-1), ...

    def __post_init__(self) -> None:
        self.middle_names = ["middle"] + [f"middle{i}" for i in range(1, self.middles)]
        names = ["ingest", "relay", "ingest_m", "storage_m", "relay_m"]
        for i in range(self.middles):
            names += [f"router{i}", f"pub{i}", f"feed{i}", f"{self.middle_names[i]}_m"]
        self.ports = {name: free_port() for name in names}
        self.registry = self.root / "registry.yaml"
        self.registry.write_text(REGISTRY_YAML)
        self.db = self.root / "store" / "readings.db"
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {"IOTPIPE_AUTH_SECRET": SECRET}

    @property
    def tiers(self) -> list[str]:
        return [*self.middle_names, "storage", "relay", "ingest"]

    @property
    def ingest_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports['ingest']}/v1/ingest"

    @property
    def relay_url(self) -> str:
        return f"ws://127.0.0.1:{self.ports['relay']}/v1/live"

    def metrics_url(self, tier: str) -> str:
        return f"http://127.0.0.1:{self.ports[tier + '_m']}"

    def _endpoints(self, kind: str) -> str:
        return ",".join(f"tcp://127.0.0.1:{self.ports[f'{kind}{i}']}"
                        for i in range(self.middles))

    def argv(self, tier: str) -> list[str]:
        p = self.ports
        common = ["--host", "127.0.0.1", "--metrics-port", str(p[tier + "_m"])]
        if tier in self.middle_names:
            i = self.middle_names.index(tier)
            return ["middle", *common, "--router-port", str(p[f"router{i}"]),
                    "--pub-port", str(p[f"pub{i}"]), "--feed-port", str(p[f"feed{i}"]),
                    "--data-dir", str(self.root / tier), "--log-bytes", str(256 << 20),
                    "--segment-bytes", str(8 << 20), "--middle-id", f"mid-{i}",
                    "--consumer-groups", "storage", "--lease-timeout", "3",
                    "--consumer-timeout", "3", *self.middle_args]
        if tier == "storage":
            return ["storage", *common, "--feed-endpoints", self._endpoints("feed"),
                    "--group", "storage", "--consumer-id", "store-0",
                    "--sinks", f"sqlite://{self.db}", "--registry-file", str(self.registry),
                    "--data-dir", str(self.root / "store"), *self.storage_args]
        if tier == "relay":
            return ["relay", *common, "--port", str(p["relay"]),
                    "--middle-pub-endpoints", self._endpoints("pub"),
                    "--registry-file", str(self.registry), *self.relay_args]
        if tier == "ingest":
            return ["ingest", *common, "--port", str(p["ingest"]),
                    "--data-dir", str(self.root / "ingest"), "--queue-bytes", str(64 << 20),
                    "--node-id", "ing-0", "--middle-endpoints", self._endpoints("router"),
                    "--forward-ack-timeout", "1", "--rate-limit", "0", *self.ingest_args]
        raise ValueError(tier)

    def start(self, tier: str, wait: bool = True) -> subprocess.Popen[bytes]:
        proc = self.procs.iotpipe(*self.argv(tier), name=tier, env=self.env)
        self.running[tier] = proc
        if wait:
            self.wait_ready(tier)
        return proc

    def start_all(self) -> None:
        for tier in self.tiers:
            self.start(tier, wait=False)
        for tier in self.tiers:
            self.wait_ready(tier)

    def wait_ready(self, tier: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        proc = self.running[tier]
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{tier} exited with {proc.returncode}:\n"
                                     f"{self.procs.log(tier)[-3000:]}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                http_get(self.metrics_url(tier) + "/readyz", timeout=1)
                return
            time.sleep(0.1)
        raise AssertionError(f"{tier} not ready within {timeout}s:\n{self.procs.log(tier)[-3000:]}")

    def kill(self, tier: str) -> None:
        proc = self.running[tier]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def terminate(self, tier: str, timeout: float = 60.0) -> int:
        proc = self.running[tier]
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def metrics(self, tier: str) -> str:
        return http_get(self.metrics_url(tier) + "/metrics")

    def device_token(self, device: str) -> str:
        return issue_token(SECRET.encode(), device, DEVICE_AUDIENCE, 3600)

    def client_token(self, app: str = "test-app") -> str:
        return issue_token(SECRET.encode(), app, CLIENT_AUDIENCE, 3600)

    # -- storage checks -------------------------------------------------------------------

    def query(self, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "iotpipe.cli", "query", "--db", str(self.db), *args],
            capture_output=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr.decode()
        return result.stdout.decode()

    def stored_count(self) -> int:
        if not self.db.exists():
            return 0
        return int(self.query("--count").strip() or 0)

    def stored(self) -> list[dict[str, object]]:
        return [orjson.loads(line) for line in self.query("--json").splitlines() if line]

    def wait_stored(self, expected: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        count = -1
        while time.monotonic() < deadline:
            count = self.stored_count()
            if count >= expected:
                return count
            time.sleep(0.5)
        return count


# -- devices ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Devices that send numbered messages, wait for acks, and resend unacked ids on reconnect."""

    url: str
    tokens: dict[str, str]
    batch: int = 5
    interval: float = 0.05
    per_device: int | None = None  # stop after this many messages per device
    spread_sources: int = 0  # bind to 127.0.0.2.. 127.0.0.(1+N) when > 0
    hold: asyncio.Event | None = None  # wait for it after connecting, before sending
    reply_timeout: float = 10.0
    pad: int = 0  # extra bytes of payload per message
    ramp_s: float = 0.0  # spread the first connection attempts over this many seconds
    acked: dict[str, set[str]] = field(default_factory=dict)
    sent: dict[str, set[str]] = field(default_factory=dict)
    acks_seen: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    connected: int = 0
    max_connected: int = 0
    busy: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._device(i, device, stop)
                               for i, device in enumerate(self.tokens)))

    def total_acked(self) -> int:
        return sum(len(ids) for ids in self.acked.values())

    def acked_pairs(self) -> set[tuple[str, str]]:
        return {(d, m) for d, ids in self.acked.items() for m in ids}

    def sent_pairs(self) -> set[tuple[str, str]]:
        return {(d, m) for d, ids in self.sent.items() for m in ids}

    async def _device(self, index: int, device: str, stop: asyncio.Event) -> None:
        acked = self.acked.setdefault(device, set())
        sent = self.sent.setdefault(device, set())
        pending: list[str] = []
        next_n = 0
        failures = 0
        kwargs: dict[str, object] = {}
        if self.spread_sources:
            kwargs["local_addr"] = (f"127.0.0.{2 + index % self.spread_sources}", 0)
        headers = {"Authorization": f"Bearer {self.tokens[device]}"}
        if self.ramp_s:
            await asyncio.sleep(self.ramp_s * index / max(1, len(self.tokens)))

        def finished() -> bool:
            if pending:
                return False
            return stop.is_set() or (self.per_device is not None and next_n >= self.per_device)

        while not finished():
            try:
                async with connect(self.url, additional_headers=headers, open_timeout=10,
                                   close_timeout=1, max_queue=64, **kwargs) as ws:
                    self.connected += 1
                    self.max_connected = max(self.max_connected, self.connected)
                    try:
                        failures = 0
                        if self.hold is not None:
                            await self.hold.wait()
                        while not finished():
                            if not pending:
                                limit = self.per_device if self.per_device is not None else 1 << 62
                                k = min(self.batch, limit - next_n)
                                pending = [f"{device}.{n}" for n in range(next_n, next_n + k)]
                                next_n += k
                                sent.update(pending)
                            frame = [{"id": m, "data": self._data(device, m)} for m in pending]
                            retry_ms, refused = await self._exchange(ws, frame, acked)
                            pending = [m for m in pending if m not in acked and m not in refused]
                            await asyncio.sleep(retry_ms / 1000 if retry_ms else self.interval)
                    finally:
                        self.connected -= 1
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
                self.reconnects += 1
                failures += 1
                backoff = min(1.0, 0.05 * 2 ** min(failures, 5))
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))

    def _data(self, device: str, msg_id: str) -> dict[str, object]:
        data: dict[str, object] = {"n": int(msg_id.rsplit(".", 1)[1]), "device": device}
        for i in range(0, self.pad, 200):  # ingest caps each string value at 256 chars
            data[f"p{i // 200}"] = "x" * min(200, self.pad - i)
        return data

    async def _exchange(self, ws: object, frame: list[dict[str, object]],
                        acked: set[str]) -> tuple[int, set[str]]:
        """Send one batch, read replies until every id is answered.

        Returns a retry hint (busy, rate limited) and the ids refused for good (errors).
        """
        assert hasattr(ws, "send")
        await ws.send(orjson.dumps(frame).decode())  # type: ignore[attr-defined]
        outstanding = {str(m["id"]) for m in frame}
        retry_ms = 0
        refused: set[str] = set()
        while outstanding:
            raw = await asyncio.wait_for(ws.recv(), self.reply_timeout)  # type: ignore[attr-defined]
            reply = orjson.loads(raw)
            ids = {str(i) for i in reply.get("ids", [])}
            kind = reply.get("type")
            if kind == "ack":
                acked.update(ids & outstanding)
                self.acks_seen.update(ids)
            elif kind == "busy" or (kind == "error" and reply.get("reason") == "rate_limited"):
                self.busy += 1
                retry_ms = max(retry_ms, int(reply.get("retry_after_ms", 200)))
            else:
                self.errors[str(reply.get("reason"))] += 1
                if not ids:
                    raise AssertionError(f"unexpected reply {reply}")
                refused |= ids
            outstanding -= ids
        return retry_ms, refused


# -- live clients ------------------------------------------------------------------------


@dataclass
class LiveClient:
    """A relay client that reconnects and keeps each connection's frames apart."""

    url: str
    token: str
    subscription: dict[str, list[str]]
    connections: list[list[dict[str, object]]] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            frames: list[dict[str, object]] = []
            try:
                async with connect(self.url, additional_headers={
                        "Authorization": f"Bearer {self.token}"}, open_timeout=5,
                        close_timeout=1) as ws:
                    self.connections.append(frames)
                    await ws.send(orjson.dumps({"op": "subscribe", **self.subscription}).decode())
                    closer = asyncio.create_task(self._close_on(stop, ws))
                    try:
                        async for raw in ws:
                            frame = orjson.loads(raw)
                            if frame.get("event") == "subscribed":
                                self.subscribed.set()
                            frames.append(frame)
                    finally:
                        closer.cancel()
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.2)

    @staticmethod
    async def _close_on(stop: asyncio.Event, ws: object) -> None:
        await stop.wait()
        await ws.close()  # type: ignore[attr-defined]

    def readings(self) -> list[dict[str, object]]:
        return [f for conn in self.connections for f in conn if f.get("event") == "reading"]


def check_live_stream(connections: list[list[dict[str, object]]]) -> dict[str, int]:
    """Per connection and source: seqs strictly increase, and every jump is announced.

    The client's filter must match every reading, so a jump of ``k`` seqs in a source must be
    covered by gap frames: ``upstream`` gaps name their source and range exactly;
    ``slow_client`` gaps only give a count over all sources, so they form a pool that jumps
    in any source may draw on (exact with one source, a tight bound with several).
    Returns totals for the caller to assert on.
    """
    totals = Counter[str]()
    for frames in connections:
        last: dict[str, int] = {}
        upstream_since: dict[str, int] = {}
        slow_pool = 0
        single_source = len({f.get("source") for f in frames
                             if f.get("event") == "reading"}) <= 1
        for frame in frames:
            event = frame.get("event")
            if event == "gap":
                missed = int(frame["missed"])  # type: ignore[call-overload]
                if frame["reason"] == "upstream":
                    source = str(frame["source"])
                    first = int(frame["from_seq"])  # type: ignore[call-overload]
                    assert source not in last or first == last[source] + 1, frame
                    upstream_since[source] = upstream_since.get(source, 0) + missed
                    totals["upstream_missed"] += missed
                else:
                    slow_pool += missed
                    totals["slow_missed"] += missed
            elif event == "reading":
                source, seq = str(frame["source"]), int(frame["seq"])  # type: ignore[call-overload]
                if source in last:
                    assert seq > last[source], f"out of order/duplicate: {seq} after {last[source]}"
                    jump = seq - last[source] - 1
                    upstream = upstream_since.get(source, 0)
                    low = upstream + slow_pool if single_source else upstream
                    assert low <= jump <= upstream + slow_pool, (
                        f"{source}: seq {last[source]} -> {seq} skipped {jump}, gap frames "
                        f"announced {upstream} upstream + {slow_pool} slow_client")
                    slow_pool -= jump - upstream
                    totals["jumps"] += 1 if jump else 0
                last[source] = seq
                upstream_since[source] = 0
                totals["readings"] += 1
    return dict(totals)
