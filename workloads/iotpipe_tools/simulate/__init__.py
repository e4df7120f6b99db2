"""``iotpipe simulate``: a device fleet simulator and load generator for ``iotpipe ingest``.

Each simulated device holds one WebSocket connection, sends frames of ``--batch`` messages
with consecutive integer ids at ``--rate`` messages/s (0 = as fast as acks come back, with
at most ``--inflight`` unacked frames), and checks every reply:

- every id it sent is acked exactly once (``duplicate_acks`` and ``unacked`` must be 0),
- ``busy`` and ``rate_limited`` ids are sent again after the server's retry hint,
- every other error is counted by reason (those ids are not retried: the server refused
  them for good).

With ``--reconnect`` a device whose connection closes (drain, restart) reconnects with
backoff and sends its unacked ids again; duplicates this creates downstream are removed by
storage, which keys on (device_id, msg_id). Tokens are minted here from ``--secret`` (or
``IOTPIPE_AUTH_SECRET``); ``--insecure`` uses ``?device=``. Connections to a loopback target
are spread over source addresses 127.0.0.2, 127.0.0.3, ... (about 28k ports each).

Message ids are never reused across runs, because storage keeps one reading per (device,
message id) and would drop a second run's readings as duplicates of the first's: each run
starts its ids at ``--first-id``, by default the run's start time in microseconds since the
epoch. A run sends far fewer than one message per microsecond per device, so the next run
starts above every id this one used (as long as the clock does not step back).

``--payload fleet`` makes the devices look like a fleet: device ``<prefix><i>`` is a
thermometer, an electricity meter or a pump (by ``i % 3``) sending plausible, drifting
values; :func:`fleet_registry_yaml` writes the matching device registry (classes and
locations), as ``iotpipe up`` does. ``--payload synthetic`` (the default, for load tests)
sends padded messages of about ``--size`` bytes.

A refused handshake is reported with the server's reason (``HTTP 401 bad_signature: ...``).

The report (``--json``: one JSON object on stdout) gives acks/s and ack latency
percentiles. Exit status: 0 if every sent message was acked exactly once and no message was
refused, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import Field
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from iotpipe.auth import DEVICE_AUDIENCE, issue_token, load_secret
from iotpipe.settings import TierSettings, parse_settings, tier_config

__all__ = ["SimulateSettings", "SimulationReport", "main", "run_simulation"]

RETRIED_REASONS = ("rate_limited",)
LATENCY_SAMPLES = 200_000  # reservoir size: percentiles stay exact-ish, memory stays flat
PORTS_PER_SOURCE = 20000  # below the ~28k ephemeral ports, leaving room for the rest


class SimulateSettings(TierSettings):
    """Simulate a fleet of devices against an ingest server and check every ack."""

    model_config = tier_config("iotpipe simulate", "IOTPIPE_SIMULATE_", {"json_output": "json"})

    url: str = Field("ws://127.0.0.1:8080/v1/ingest", description="ingest WebSocket URL")
    connections: int = Field(100, ge=1, description="simulated devices (one connection each)")
    rate: float = Field(0.0, ge=0, description="messages/s per device (0 = as fast as acked)")
    size: int = Field(64, ge=16, le=60000, description="approximate JSON bytes per message")
    batch: int = Field(1, ge=1, description="messages per frame (>1: JSON array frames)")
    inflight: int = Field(2, ge=1, description="unacked frames per device")
    messages: int = Field(0, ge=0, description="messages per device (0: run for --duration)")
    duration: float = Field(10.0, gt=0, description="seconds to send (with --messages: the "
                            "time limit for sending them)")
    ramp: float = Field(0.0, ge=0, description="seconds over which connections are opened")
    connect_concurrency: int = Field(256, ge=1, description="handshakes in progress at once")
    ack_timeout: float = Field(30.0, gt=0, description="seconds to wait for the last acks")
    device_prefix: str = Field("sim-", description="device ids are <prefix><index>")
    first_device: int = Field(0, ge=0, description="index of the first device")
    first_id: int | None = Field(None, ge=1, le=2**62,
                                 description="first message id of every device (default: "
                                             "the start time in microseconds, so a later "
                                             "run never reuses an id)")
    payload: Literal["synthetic", "fleet"] = Field(
        "synthetic", description="synthetic: padded messages of --size bytes; fleet: "
                                 "thermometers, meters and pumps with drifting values")
    secret: str = Field("", description="token secret (default: IOTPIPE_AUTH_SECRET or the "
                                         "file named by IOTPIPE_AUTH_SECRET_FILE)")
    insecure: bool = Field(False, description="no token; send ?device=<id> (insecure ingest)")
    reconnect: bool = Field(False, description="reconnect and resend unacked ids on close")
    spread_sources: bool = Field(True, description="use 127.0.0.2.. as source addresses")
    acked_file: Path | None = Field(None, description="write acked 'device_id<TAB>msg_id' lines")
    json_output: bool = Field(False, description="print one JSON report (also --json)")


class AckedIds:
    """The set of acked ids of one device in O(gaps) memory: ids are acked mostly in order,
    so everything from ``first`` up to ``floor`` is acked and only ids above it are kept in a
    set."""

    __slots__ = ("_above", "first", "floor")

    def __init__(self, first: int = 1) -> None:
        self.first = first
        self.floor = first - 1
        self._above: set[int] = set()

    def add(self, msg_id: int) -> None:
        if msg_id <= self.floor:
            return
        self._above.add(msg_id)
        while self.floor + 1 in self._above:
            self.floor += 1
            self._above.discard(self.floor)

    def __contains__(self, msg_id: object) -> bool:
        return isinstance(msg_id, int) and (self.first <= msg_id <= self.floor
                                            or msg_id in self._above)

    def __len__(self) -> int:
        return self.floor - self.first + 1 + len(self._above)

    def __iter__(self) -> Iterator[int]:
        yield from range(self.first, self.floor + 1)
        yield from sorted(self._above)


@dataclass
class SimulationReport:
    connections: int = 0
    connected: int = 0
    never_connected: int = 0
    connect_failures: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # "HTTP 401 reason: detail"
    sent: int = 0
    acked: int = 0
    resent: int = 0
    duplicate_acks: int = 0
    unknown_acks: int = 0
    unacked: int = 0
    busy: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    elapsed_s: float = 0.0
    send_elapsed_s: float = 0.0
    acked_at_stop: int = 0
    steady_acks_per_s: float | None = None  # after every device connected, until stop
    latencies_s: list[float] = field(default_factory=list)  # a uniform reservoir sample
    latency_count: int = 0
    acked_ids: dict[str, AckedIds] = field(default_factory=dict)

    def add_latency(self, seconds: float) -> None:
        self.latency_count += 1
        if len(self.latencies_s) < LATENCY_SAMPLES:
            self.latencies_s.append(seconds)
        else:
            slot = random.randrange(self.latency_count)
            if slot < LATENCY_SAMPLES:
                self.latencies_s[slot] = seconds

    def write_acked(self, path: Path) -> None:
        """One 'device_id<TAB>msg_id' line per acked message."""
        with open(path, "w") as out:
            for device_id, ids in self.acked_ids.items():
                out.writelines(f"{device_id}\t{i}\n" for i in ids)

    @property
    def ok(self) -> bool:
        # Connect failures that a reconnect got past are not failures of the run; a
        # device that never connected is.
        return (self.unacked == 0 and self.duplicate_acks == 0 and self.unknown_acks == 0
                and not self.refused and self.acked > 0 and self.never_connected == 0)

    @property
    def refused(self) -> int:
        return sum(n for reason, n in self.errors.items() if reason not in RETRIED_REASONS)

    def percentile(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    def to_dict(self) -> dict[str, Any]:
        p50, p99 = self.percentile(0.50), self.percentile(0.99)
        return {
            "ok": self.ok,
            "connections": self.connections,
            "connected": self.connected,
            "never_connected": self.never_connected,
            "connect_failures": dict(self.connect_failures),
            "refusals": dict(self.refusals),
            "sent": self.sent,
            "acked": self.acked,
            "resent": self.resent,
            "busy": self.busy,
            "duplicate_acks": self.duplicate_acks,
            "unknown_acks": self.unknown_acks,
            "unacked": self.unacked,
            "errors": dict(self.errors),
            "closes": dict(self.closes),
            "reconnects": self.reconnects,
            "elapsed_s": round(self.elapsed_s, 3),
            "acks_per_s": round(self.acked_at_stop / self.send_elapsed_s, 1)
            if self.send_elapsed_s else 0.0,
            "steady_acks_per_s": None if self.steady_acks_per_s is None
            else round(self.steady_acks_per_s, 1),
            "ack_latency_ms": {
                "p50": None if p50 is None else round(p50 * 1000, 3),
                "p99": None if p99 is None else round(p99 * 1000, 3),
            },
        }


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (root may raise the hard limit); the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    for new_hard in (max(hard, wanted), hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, new_hard), new_hard))
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_addresses(url: str, connections: int, spread: bool) -> list[str | None]:
    """Source address per connection slot: 127.0.0.2.. for an IPv4 loopback target."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return [None]
    if not spread or not (address.version == 4 and address.is_loopback):
        return [None]
    count = max(1, math.ceil(connections / PORTS_PER_SOURCE))
    return [f"127.0.0.{2 + i}" for i in range(count)]


def message_data(size: int, seq: int) -> dict[str, Any]:
    """A data object whose message is about ``size`` bytes of JSON."""
    data: dict[str, Any] = {"v": seq * 0.5}
    room = size - 40  # the {"id":..,"data":{"v":..}} envelope
    index = 0
    while room > 8:
        chunk = min(room - 8, 200)
        data[f"p{index}"] = "x" * chunk
        room -= chunk + 8
        index += 1
    return data


FLEET_KINDS = ("thermometer", "meter", "pump")
FLEET_LOCATIONS = ("plant-a/hall-1", "plant-a/hall-2", "plant-a/boiler-room",
                   "plant-b/roof", "plant-b/basement", "office/floor-1")
_FLEET_MODELS = {"thermometer": "TH-20", "meter": "EM-340", "pump": "PX-75"}


def fleet_kind(index: int) -> str:
    """The kind of simulated device ``index`` in a ``--payload fleet`` run."""
    return FLEET_KINDS[index % len(FLEET_KINDS)]


def fleet_location(index: int) -> str:
    return FLEET_LOCATIONS[(index // len(FLEET_KINDS)) % len(FLEET_LOCATIONS)]


def fleet_registry_yaml(prefix: str, count: int) -> str:
    """A device registry (YAML) for devices ``<prefix>0 .. <prefix>{count-1}`` of a fleet run:
    class and location per device, and a fallback for other ids under the prefix."""
    lines = [
        "# Device registry used by storage (enrichment) and the relay (class/location",
        "# subscriptions). Exact ids under `devices`, id prefixes under `prefixes`; the",
        "# longest prefix wins.",
        "devices:" if count else "devices: {}",
    ]
    for i in range(count):
        kind = fleet_kind(i)
        lines.append(f"  {prefix}{i}: {{class: {kind}, location: {fleet_location(i)}, "
                     f"labels: {{model: {_FLEET_MODELS[kind]}, source: iotpipe-simulate}}}}")
    lines += ["prefixes:",
              f"  {prefix}: {{class: simulated, location: local, "
              "labels: {source: iotpipe-simulate}}"]
    return "\n".join(lines) + "\n"


class FleetSensor:
    """Plausible, drifting readings of one simulated device (a bounded random walk).

    Thermometers follow a slow daily swing around their own set point; meters count energy
    up from a random start at a drifting load; pumps switch on and off now and then and
    report flow and pressure while running.
    """

    def __init__(self, index: int, seed: int | None = None) -> None:
        self.kind = fleet_kind(index)
        self._rng = random.Random(index if seed is None else seed)
        rng = self._rng
        self._last = time.time()
        self.setpoint = rng.uniform(18.0, 23.0)
        self.offset = 0.0
        self.humidity = rng.uniform(35.0, 55.0)
        self.energy_kwh = rng.uniform(1_000.0, 50_000.0)
        self.power_w = rng.uniform(800.0, 4_000.0)
        self.running = rng.random() < 0.7
        self.flow_lpm = rng.uniform(90.0, 150.0)
        self.pressure_bar = rng.uniform(2.5, 4.0)

    def _walk(self, value: float, step: float, low: float, high: float) -> float:
        return min(high, max(low, value + self._rng.gauss(0.0, step)))

    def reading(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        elapsed = max(0.0, now - self._last)
        self._last = now
        rng = self._rng
        if self.kind == "thermometer":
            self.offset = self._walk(self.offset, 0.05, -3.0, 3.0)
            daily = 1.5 * math.sin(2 * math.pi * ((now / 86400.0) % 1.0))
            self.humidity = self._walk(self.humidity, 0.2, 20.0, 80.0)
            return {"temp_c": round(self.setpoint + daily + self.offset, 2),
                    "humidity_pct": round(self.humidity, 1)}
        if self.kind == "meter":
            self.power_w = self._walk(self.power_w, 25.0, 200.0, 9_000.0)
            self.energy_kwh += self.power_w * elapsed / 3_600_000.0
            return {"energy_kwh": round(self.energy_kwh, 4), "power_w": round(self.power_w, 1),
                    "voltage_v": round(rng.gauss(230.0, 1.5), 1)}
        if rng.random() < 0.02:  # a pump changes state now and then
            self.running = not self.running
        if self.running:
            self.flow_lpm = self._walk(self.flow_lpm, 2.0, 60.0, 180.0)
            self.pressure_bar = self._walk(self.pressure_bar, 0.03, 1.5, 5.0)
        return {"running": self.running,
                "flow_lpm": round(self.flow_lpm, 1) if self.running else 0.0,
                "pressure_bar": round(self.pressure_bar if self.running else 0.2, 2)}


class _Device:
    """One simulated device: its connection, unacked ids and resend queue."""

    def __init__(self, sim: _Simulation, index: int) -> None:
        self.sim = sim
        self.device_id = f"{sim.settings.device_prefix}{index}"
        self.source = sim.sources[index % len(sim.sources)]
        self.first_id = sim.first_id
        self.next_id = sim.first_id
        self.sensor = FleetSensor(index) if sim.settings.payload == "fleet" else None
        self.pending: dict[int, float] = {}    # id -> when last sent
        self.acked = AckedIds(sim.first_id)
        self.refused: set[int] = set()
        self.retry: list[int] = []             # ids to send again (busy / rate_limited)
        self.retry_at = 0.0
        self.frame_no = 0
        self.frame_left: dict[int, int] = {}   # frame number -> ids without a final answer
        self.frame_of: dict[int, int] = {}     # id -> frame number it was last sent in
        self.window_open = asyncio.Event()
        self.window_open.set()
        self.ever_connected = False

    def all_settled(self) -> bool:
        return not self.pending and not self.retry

    async def run(self) -> None:
        settings = self.sim.settings
        backoff = 0.1
        while True:
            try:
                # At most --connect-concurrency handshakes at once: a storm of thousands
                # only makes them all time out.
                async with self.sim.handshakes:
                    ws = await self.sim.connect(self)
                async with ws:
                    self.sim.report.connected += 1
                    if not self.ever_connected:
                        self.ever_connected = True
                        self.sim.first_connect()
                    backoff = 0.1
                    # After a reconnect, everything not yet acked goes again.
                    if self.pending:
                        self.retry.extend(sorted(self.pending))
                        self.retry.sort()
                        self.sim.report.resent += len(self.pending)
                        self.pending.clear()
                    self.frame_left.clear()
                    self.frame_of.clear()
                    self.window_open.set()
                    sender = asyncio.create_task(self._send_loop(ws))
                    receiver = asyncio.create_task(self._receive(ws))
                    try:
                        await asyncio.wait({sender, receiver},
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in (sender, receiver):
                            task.cancel()
                        results = await asyncio.gather(sender, receiver,
                                                       return_exceptions=True)
                    for result in results:
                        if isinstance(result, ConnectionClosed):
                            raise result
                    return
            except InvalidStatus as exc:
                status = exc.response.status_code
                self.sim.report.connect_failures[f"http_{status}"] += 1
                reason = exc.response.body.decode(errors="replace").strip()[:200]
                self.sim.report.refusals[f"HTTP {status} {reason}".strip()] += 1
                if not settings.reconnect:
                    return
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                self.sim.report.closes[str(code)] += 1
                if not settings.reconnect or self.sim.finished(self):
                    return
            except (OSError, TimeoutError) as exc:
                self.sim.report.connect_failures[type(exc).__name__] += 1
                if not settings.reconnect:
                    return
            if time.monotonic() > self.sim.give_up_at:
                return
            self.sim.report.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _send_loop(self, ws: ClientConnection) -> None:
        """Send fresh and retried ids until done and every id is settled."""
        settings, sim = self.sim.settings, self.sim
        interval = settings.batch / settings.rate if settings.rate > 0 else 0.0
        next_at = time.monotonic()
        while True:
            now = time.monotonic()
            fresh_allowed = not sim.stop_sending.is_set() and (
                settings.messages == 0 or self.next_id - self.first_id < settings.messages)
            if not fresh_allowed and not self.retry:
                if not self.pending or now > sim.give_up_at:
                    return
                await asyncio.sleep(0.01)  # wait for acks (or retry hints) of what is out
                continue
            await self.window_open.wait()
            now = time.monotonic()
            if self.retry and now >= self.retry_at:
                ids = self.retry[: settings.batch]
                del self.retry[: len(ids)]
            elif fresh_allowed and now >= self.retry_at:
                # A retry hint holds back fresh messages too, as the device protocol asks:
                # sending on regardless is a flood (closed with 1008).
                if interval and now < next_at:
                    # Short naps, so a slow device notices the end of the run promptly.
                    await asyncio.sleep(min(next_at - now, 0.25))
                    continue
                next_at = max(next_at + interval, now - 1.0) if interval else now
                count = settings.batch if settings.messages == 0 else \
                    min(settings.batch, settings.messages - (self.next_id - self.first_id))
                ids = list(range(self.next_id, self.next_id + count))
                self.next_id += count
                sim.report.sent += count
            else:
                await asyncio.sleep(max(0.001, self.retry_at - now))
                continue
            sent_at = time.monotonic()
            self.frame_no += 1
            self.frame_left[self.frame_no] = len(ids)
            for msg_id in ids:
                self.pending[msg_id] = sent_at
                self.frame_of[msg_id] = self.frame_no
            sensor = self.sensor
            messages = [{"id": i, "data": sensor.reading() if sensor else sim.data(i)}
                        for i in ids]
            frame = orjson.dumps(messages if settings.batch > 1 else messages[0])
            if len(self.frame_left) >= settings.inflight:
                self.window_open.clear()
            await ws.send(frame, text=True)

    def _settle(self, msg_id: int) -> None:
        """One id got its final answer on this connection: free its frame's window slot."""
        frame = self.frame_of.pop(msg_id, None)
        if frame is None:
            return
        left = self.frame_left[frame] - 1
        if left:
            self.frame_left[frame] = left
        else:
            del self.frame_left[frame]
            if len(self.frame_left) < self.sim.settings.inflight:
                self.window_open.set()

    async def _receive(self, ws: ClientConnection) -> None:
        report = self.sim.report
        while True:
            reply = orjson.loads(await ws.recv(decode=False))
            kind = reply.get("type")
            ids = [i for i in reply.get("ids", []) if isinstance(i, int)]
            now = time.monotonic()
            if kind == "ack":
                for msg_id in ids:
                    sent_at = self.pending.pop(msg_id, None)
                    if sent_at is not None:
                        self.acked.add(msg_id)
                        report.acked += 1
                        report.add_latency(now - sent_at)
                        self._settle(msg_id)
                    elif msg_id in self.acked:
                        report.duplicate_acks += 1
                    else:
                        report.unknown_acks += 1
            elif kind == "busy" or reply.get("reason") in RETRIED_REASONS:
                if kind == "busy":
                    report.busy += len(ids)
                else:
                    report.errors[reply["reason"]] += len(ids)
                retry_ms = int(reply.get("retry_after_ms", 100))
                self.retry_at = max(self.retry_at, now + retry_ms / 1000)
                for msg_id in ids:
                    if self.pending.pop(msg_id, None) is not None:
                        self.retry.append(msg_id)
                        report.resent += 1
                        self._settle(msg_id)
                self.retry.sort()
            elif kind == "error":
                report.errors[str(reply.get("reason"))] += max(1, len(ids))
                for msg_id in ids:
                    if self.pending.pop(msg_id, None) is not None:
                        self.refused.add(msg_id)
                        self._settle(msg_id)
            else:
                report.errors["unknown_reply"] += 1


class _Simulation:
    def __init__(self, settings: SimulateSettings) -> None:
        self.settings = settings
        self.report = SimulationReport(connections=settings.connections)
        self.sources = source_addresses(settings.url, settings.connections,
                                        settings.spread_sources)
        self.secret = settings.secret.encode()
        if not settings.insecure and not self.secret:
            try:
                self.secret = load_secret()
            except RuntimeError as exc:
                raise ValueError(f"give --secret or --insecure; {exc}") from None
        self.stop_sending = asyncio.Event()
        self.handshakes = asyncio.Semaphore(settings.connect_concurrency)
        self._steady: tuple[float, int] | None = None
        self._devices_connected = 0
        self.give_up_at = math.inf
        self._template = message_data(settings.size, 0)
        self.first_id = settings.first_id if settings.first_id is not None \
            else time.time_ns() // 1000

    def data(self, msg_id: int) -> dict[str, Any]:
        return {**self._template, "v": msg_id * 0.5}

    def finished(self, device: _Device) -> bool:
        return self.stop_sending.is_set() and device.all_settled()

    def connect(self, device: _Device) -> connect:
        settings = self.settings
        url = settings.url
        headers = {}
        if settings.insecure:
            url += ("&" if "?" in url else "?") + f"device={device.device_id}"
        else:
            token = issue_token(self.secret, device.device_id, DEVICE_AUDIENCE, 86400)
            headers["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {}
        if device.source is not None:
            kwargs["local_addr"] = (device.source, 0)
        return connect(url, additional_headers=headers, compression=None, open_timeout=30,
                       max_size=1 << 20, ping_interval=None, **kwargs)

    def first_connect(self) -> None:
        """A device connected for the first time; the last one ends the ramp-up."""
        self._devices_connected += 1
        if self._devices_connected == self.settings.connections:
            self._steady = (time.monotonic(), self.report.acked)

    async def run(self) -> SimulationReport:
        settings = self.settings
        raise_nofile(settings.connections + 1024)
        devices = [_Device(self, settings.first_device + i) for i in range(settings.connections)]
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()

        async def open_all() -> None:
            for i, device in enumerate(devices):
                tasks.append(asyncio.create_task(device.run()))
                if settings.ramp:
                    await asyncio.sleep(settings.ramp / settings.connections)
                elif i % 100 == 99:
                    await asyncio.sleep(0)  # let handshakes progress while we open more

        opener = asyncio.create_task(open_all())
        # The clock runs from the start, ramp included: --duration is wall time.
        if settings.messages == 0:
            await asyncio.sleep(settings.duration)
            self.stop_sending.set()
            self.report.send_elapsed_s = time.monotonic() - start
            self.report.acked_at_stop = self.report.acked
            self.give_up_at = time.monotonic() + settings.ack_timeout
            opener.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=settings.ack_timeout + 5)
        else:
            # --duration bounds the time to send them all, --ack-timeout the wait after it.
            overall = settings.duration + settings.ack_timeout
            self.give_up_at = start + overall
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opener, overall)
            if tasks:
                await asyncio.wait(tasks, timeout=max(0.0, self.give_up_at - time.monotonic()) + 5)
            self.stop_sending.set()
            self.report.send_elapsed_s = time.monotonic() - start
            self.report.acked_at_stop = self.report.acked
        if self._steady is not None:
            at, acked_then = self._steady
            window = start + self.report.send_elapsed_s - at
            if window > 0.5:
                self.report.steady_acks_per_s = (self.report.acked_at_stop - acked_then) / window
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.report.elapsed_s = time.monotonic() - start
        self.report.unacked = sum(len(d.pending) + len(d.retry) for d in devices)
        self.report.never_connected = sum(1 for d in devices if not d.ever_connected)
        self.report.acked_ids = {d.device_id: d.acked for d in devices}
        return self.report


async def run_simulation(settings: SimulateSettings) -> SimulationReport:
    return await _Simulation(settings).run()


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(SimulateSettings, argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        report = asyncio.run(run_simulation(settings))
    except ValueError as exc:
        print(f"iotpipe simulate: error: {exc}", file=sys.stderr)
        return 2
    for refusal, count in report.refusals.most_common():
        print(f"iotpipe simulate: ingest refused {count} connection(s): {refusal}",
              file=sys.stderr)
    if settings.acked_file is not None:
        report.write_acked(settings.acked_file)
    result = report.to_dict()
    if settings.json_output:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    return 0 if report.ok else 1
