"""``iotpipe bench relay``: live events from a PUB socket to WebSocket clients, per CPU-second.

The same load goes, in the same run, to three servers in their own processes:

* ``bare``: the plainest fan-out on websockets: a SUB socket read in bursts, each
  reading's bytes appended to the unbounded queue of every client that wants it, one
  sender task per client awaiting ``send``. No decoding, no bound, no gap accounting.
* ``bare_picows``: the same on picows, written as cheaply as we know how: each event's
  WebSocket frame built once, each client's frames of one loop turn in one write.
* ``relay``: a real ``iotpipe relay`` (JSON reading frames, subscriptions, credit, gaps).

Subscription shapes (``--shape``): ``all`` (every client gets every event), ``device``
(client *i* follows device ``dev-{i % 100}``: each event reaches 1 % of the clients; the
bare servers route on the ZeroMQ topic) and ``prefix`` (client *i* follows the prefix
``dev-{1 + i % 9}``, 11 of the 100 devices; relay only).

A publisher thread sends ``--events`` live events as fast as it can, in the middle's v2
format (``--group`` readings per message, as a commit group) or, with ``--live-format v1``,
one message per event (middles before v2); ``--clients`` picows
clients in this process count what they receive. ``events_per_s`` is events published per
second of wall time until the last client got its last frame; ``frames_per_s`` counts the
frames delivered (summed over clients); ``server_cpu_s`` is the server process's user+system
CPU over the same window and ``frames_per_cpu_s`` delivered frames per server CPU-second,
the cost measure that does not depend on how fast the clients read (they share the cores).
``ratio`` (events/s) and ``cpu_ratio`` (frames per CPU-second) compare each server with
``bare`` measured in the same run, and ``cpu_ratio_vs_picows`` with ``bare_picows``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any, Literal

import orjson
import zmq
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server
from pydantic import Field
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from iotpipe.settings import TierSettings, parse_settings, tier_config
from iotpipe.wire import (
    decode_live_group,
    encode_live,
    encode_live_group,
    encode_reading,
    reading_topic,
)
from iotpipe.wsframes import encode_text_frames
from iotpipe_tools.ports import free_port
from iotpipe_tools.processes import cpu_seconds, stop
from iotpipe_tools.sources import raise_nofile
from iotpipe_tools.waiting import exited, wait_port, wait_ready

__all__ = ["RelayBenchSettings", "bare_picows_relay", "bare_relay", "main"]

_WARM_DEVICE = "warm-0"
_DEVICES = 100
SERVERS = ("bare", "bare_picows", "relay")
Shape = Literal["all", "device", "prefix"]


class RelayBenchSettings(TierSettings):
    """Live events/s and frames per CPU-second: iotpipe relay vs bare fan-outs, same run."""

    model_config = tier_config("iotpipe bench relay", "IOTPIPE_BENCH_RELAY_",
                               {"json_output": "json"})

    events: int = Field(50_000, ge=1, description="live events published per server")
    clients: int = Field(4, ge=1, description="WebSocket clients")
    shape: Shape = Field("all", description="subscription shape: all, device or prefix")
    data_bytes: int = Field(64, ge=2, description="approximate size of each reading's data JSON")
    live_format: Literal["v1", "v2"] = Field(
        "v2", description="live messages as a middle sends them: v2 = one per group, "
                          "v1 = one per event")
    group: int = Field(64, ge=1, description="events per v2 message (a middle's commit group)")
    json_output: bool = Field(False, description="print one JSON object")


def _subscription(shape: Shape, index: int) -> dict[str, Any]:
    """Client ``index``'s subscribe frame for ``shape`` (the warm-up device included)."""
    if shape == "all":
        return {"op": "subscribe", "all": True}
    if shape == "device":
        return {"op": "subscribe", "devices": [f"dev-{index % _DEVICES}", _WARM_DEVICE]}
    return {"op": "subscribe", "prefixes": [f"dev-{1 + index % 9}"], "devices": [_WARM_DEVICE]}


def _wants(subscription: dict[str, Any], device: str) -> bool:
    if subscription.get("all"):
        return True
    if device in subscription.get("devices", ()):
        return True
    return any(device.startswith(p) for p in subscription.get("prefixes", ()))


def _topics_and_readings(frames: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(device topic, reading) of each event of a v1 or v2 live message (the bare servers)."""
    if len(frames) == 4:
        return [(reading_topic(r) or b"", r) for r in decode_live_group(frames).readings]
    return [(frames[0], frames[2])]


class _Routes:
    """The bare servers' routing: clients by exact device topic, or everything."""

    def __init__(self) -> None:
        self.everything: dict[Any, None] = {}
        self.by_device: dict[bytes, dict[Any, None]] = {}

    def add(self, client: Any, frame: bytes) -> None:
        request = orjson.loads(frame)
        if request.get("all"):
            self.everything[client] = None
        for device in request.get("devices", ()):
            self.by_device.setdefault(device.encode(), {})[client] = None

    def remove(self, client: Any) -> None:
        self.everything.pop(client, None)
        for holders in self.by_device.values():
            holders.pop(client, None)

    def match(self, topic: bytes) -> Any:
        holders = self.by_device.get(topic)
        if holders:
            return (*self.everything, *holders) if self.everything else holders
        return self.everything


def _serve_sub(pub_endpoint: str, on_burst: Any) -> tuple[zmq.Context[Any], zmq.Socket[bytes]]:
    """A SUB socket whose ready messages are handed to ``on_burst`` up to 512 at a time."""
    context: zmq.Context[Any] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub_endpoint)
    loop = asyncio.get_running_loop()
    noblock = int(zmq.NOBLOCK)

    def drain() -> None:
        burst: list[list[bytes]] = []
        more = True
        for _ in range(512):
            try:
                burst.append(sub.recv_multipart(noblock))
            except zmq.Again:
                more = False
                break
        on_burst(burst)
        if more:
            loop.call_soon(drain)

    loop.add_reader(sub.getsockopt(zmq.FD), drain)
    loop.call_soon(drain)
    return context, sub


def _run(main: Any) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())


def bare_relay(port: int, pub_endpoint: str) -> None:
    """Baseline on websockets: SUB -> per-client unbounded queue -> ``send`` of raw bytes."""
    routes = _Routes()
    queues: dict[ServerConnection, tuple[deque[bytes], asyncio.Event]] = {}

    async def sender(connection: ServerConnection, queue: deque[bytes],
                     wake: asyncio.Event) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                while queue:
                    await connection.send(queue.popleft())
                wake.clear()
                await wake.wait()

    async def handler(connection: ServerConnection) -> None:
        queue: deque[bytes] = deque()
        wake = asyncio.Event()
        routes.add(connection, await connection.recv(decode=False))
        queues[connection] = (queue, wake)
        task = asyncio.create_task(sender(connection, queue, wake))
        try:
            await connection.wait_closed()
        finally:
            routes.remove(connection)
            queues.pop(connection, None)
            task.cancel()

    def on_burst(burst: list[list[bytes]]) -> None:
        woken: dict[ServerConnection, None] = {}
        for frames in burst:
            for topic, reading in _topics_and_readings(frames):
                for connection in routes.match(topic):
                    queues[connection][0].append(reading)
                    woken[connection] = None
        for connection in woken:
            queues[connection][1].set()

    async def run() -> None:
        _serve_sub(pub_endpoint, on_burst)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with serve(handler, "127.0.0.1", port, compression=None):
            await stop.wait()

    _run(run)


def bare_picows_relay(port: int, pub_endpoint: str) -> None:
    """Baseline on picows: each event's frame built once, one write per client per turn."""
    routes = _Routes()

    class Client(WSListener):  # type: ignore[misc]  # picows ships no stub base
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type == WSMsgType.TEXT:
                routes.add(transport, frame.get_payload_as_bytes())
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.disconnect()

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            routes.remove(transport)

    def on_burst(burst: list[list[bytes]]) -> None:
        out: dict[WSTransport, list[bytes]] = {}
        for frames in burst:
            for topic, reading in _topics_and_readings(frames):
                clients = routes.match(topic)
                if not clients:
                    continue
                wire = encode_text_frames([reading])
                for transport in clients:
                    pending = out.get(transport)
                    if pending is None:
                        out[transport] = [wire]
                    else:
                        pending.append(wire)
        for transport, pending in out.items():
            transport.underlying_transport.write(b"".join(pending))

    async def run() -> None:
        _serve_sub(pub_endpoint, on_burst)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        # picows warns on every write pause; a baseline with unbounded buffers pauses often.
        quiet = logging.getLogger("picows.bench")
        quiet.setLevel(logging.ERROR)
        server = await ws_create_server(lambda _request: Client(), "127.0.0.1", port,
                                        logger_name=quiet)
        await stop.wait()
        server.close()

    raise_nofile(1 << 16)
    _run(run)


def _events(settings: RelayBenchSettings) -> tuple[list[list[bytes]], list[str]]:
    """The live messages to publish and the device of each event, in order."""
    pad = "x" * max(0, settings.data_bytes - 24)
    data = orjson.dumps({"t": 21.5, "s": pad})
    now = time.time_ns()
    devices = [f"dev-{i % _DEVICES}" for i in range(settings.events)]
    readings = [encode_reading(device, str(i), now + i, data, now + i)
                for i, device in enumerate(devices)]
    if settings.live_format == "v1":
        return [encode_live(d, "bench", i + 1, r)
                for i, (d, r) in enumerate(zip(devices, readings, strict=True))], devices
    step = settings.group
    return [encode_live_group("bench", start + 1, readings[start:start + step])
            for start in range(0, len(readings), step)], devices


class _Client(WSListener):  # type: ignore[misc]  # picows ships no stub base
    """Counts reading frames (and events reported missing in gap frames) until ``expected``."""

    def __init__(self, expected: int, done_at: list[float]) -> None:
        super().__init__()
        self.expected = expected
        self.done_at = done_at
        self.received = 0
        self.missed = 0
        self.ready = asyncio.get_running_loop().create_future()
        self.subscribed = asyncio.get_running_loop().create_future()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT and frame.msg_type != WSMsgType.BINARY:
            return
        raw = frame.get_payload_as_bytes()
        if raw.startswith(b'{"event":"reading"') or not raw.startswith(b'{"event"'):
            if _WARM_DEVICE.encode() in raw:
                if not self.ready.done():
                    self.ready.set_result(None)
                return
            self.received += 1
        elif raw.startswith(b'{"event":"gap"'):
            self.missed += int(orjson.loads(raw)["missed"])
        elif raw.startswith(b'{"event":"subscribed"') and not self.subscribed.done():
            self.subscribed.set_result(None)
            return
        else:
            return
        if self.received + self.missed == self.expected:
            self.done_at.append(time.perf_counter())


def _publish(pub: zmq.Socket[bytes], events: list[list[bytes]], started: list[float]) -> None:
    started.append(time.perf_counter())
    for frames in events:
        pub.send_multipart(frames)


async def _measure(server: str, url: str, pid: int, pub: zmq.Socket[bytes],
                   events: list[list[bytes]], devices: list[str],
                   settings: RelayBenchSettings) -> dict[str, Any]:
    done_at: list[float] = []
    clients: list[_Client] = []
    transports: list[WSTransport] = []
    gate = asyncio.Semaphore(64)

    # Events per device, counted once: each client's expected count is a sum over the
    # 100 devices, not a scan of every event (minutes at 1,000 clients and 10^5+ events).
    per_device = Counter(devices)

    async def one(index: int) -> None:
        subscription = _subscription(settings.shape, index)
        expected = sum(n for device, n in per_device.items() if _wants(subscription, device))
        for _attempt in range(3):
            async with gate:
                transport, client = await ws_connect(lambda: _Client(expected, done_at), url,
                                                     websocket_handshake_timeout=60)
            if client is not None:  # None: the connection was lost meanwhile (overload)
                break
        else:
            raise RuntimeError(f"{server}: client {index} could not connect")
        transport.send(WSMsgType.TEXT, orjson.dumps(subscription))
        if server == "relay":
            await asyncio.wait_for(client.subscribed, 60)
        clients.append(client)
        transports.append(transport)

    try:
        await asyncio.gather(*(one(i) for i in range(settings.clients)))
        # PUB/SUB joins asynchronously: warm up until every client has seen an event.
        warm_seq = 0
        deadline = time.monotonic() + 60
        while not all(c.ready.done() for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("clients never received warm-up events")
            warm_seq += 1
            pub.send_multipart(encode_live(_WARM_DEVICE, "warm", warm_seq,
                                           encode_reading(_WARM_DEVICE, "w", 1, b"{}", 1)))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let in-flight warm-up events arrive first
        waiting = [c for c in clients if c.expected]
        cpu_before = cpu_seconds(pid)
        started: list[float] = []
        await asyncio.to_thread(_publish, pub, events, started)
        deadline = time.monotonic() + 300
        while len(done_at) < len(waiting):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server}: {len(done_at)} of {len(waiting)} clients done")
            await asyncio.sleep(0.01)
        cpu = cpu_seconds(pid) - cpu_before
    finally:
        for transport in transports:
            transport.disconnect()
    elapsed = (max(done_at) if done_at else time.perf_counter()) - started[0]
    frames = sum(c.received for c in clients)
    return {
        "events_per_s": round(len(devices) / elapsed),
        "frames_per_s": round(frames / elapsed),
        "frames": frames,
        "missed": sum(c.missed for c in clients),
        "seconds": round(elapsed, 3),
        "server_cpu_s": round(cpu, 3),
        "frames_per_cpu_s": round(frames / cpu) if cpu > 0 else None,
    }


def _start(server: str, port: int, endpoint: str, settings: RelayBenchSettings
           ) -> subprocess.Popen[bytes]:
    if server != "relay":
        function = "bare_relay" if server == "bare" else "bare_picows_relay"
        proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys; from iotpipe_tools.bench.relay import {function}; "
             f"{function}(int(sys.argv[1]), sys.argv[2])", str(port), endpoint])
        try:
            wait_port(port, 30, abort=exited(proc, server))
        except AssertionError:
            stop(proc, timeout=15)
            raise
        return proc
    metrics_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "iotpipe.cli", "relay", "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", str(metrics_port),
         "--middle-pub-endpoints", endpoint, "--insecure-no-auth",
         "--registry-file", os.devnull, "--client-queue", str(settings.events + 100),
         "--max-clients", str(settings.clients + 10),
         "--sub-hwm", str(10**9), "--log-level", "warning"])
    try:
        wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", 30,
                   what="the relay to be ready", abort=exited(proc, "relay"))
    except AssertionError:
        stop(proc, timeout=15)
        raise
    return proc


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run(settings: RelayBenchSettings) -> dict[str, Any]:
    raise_nofile(1 << 16)
    context: zmq.Context[Any] = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)  # never drop in the publisher: measure the servers
    pub.setsockopt(zmq.LINGER, 0)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{pub_port}"
    events, devices = _events(settings)
    # The bare servers route on exact device ids only: the prefix shape is the relay's alone.
    servers = SERVERS if settings.shape != "prefix" else ("relay",)
    results: list[dict[str, Any]] = []
    try:
        for server in servers:
            port = free_port()
            proc = _start(server, port, endpoint, settings)
            try:
                result = asyncio.run(_measure(server, f"ws://127.0.0.1:{port}/v1/live",
                                              proc.pid, pub, events, devices, settings))
            finally:
                stop(proc, timeout=15)
            results.append({"server": server, **result})
    finally:
        pub.close(0)
        context.term()
    by_name = {row["server"]: row for row in results}
    for row in results:
        if row["server"] != "bare" and "bare" in by_name:
            row["ratio"] = _ratio(row["events_per_s"], by_name["bare"]["events_per_s"])
            row["cpu_ratio"] = _ratio(row["frames_per_cpu_s"], by_name["bare"]["frames_per_cpu_s"])
        if row["server"] == "relay" and "bare_picows" in by_name:
            row["cpu_ratio_vs_picows"] = _ratio(row["frames_per_cpu_s"],
                                                by_name["bare_picows"]["frames_per_cpu_s"])
    return {
        "bench": "relay",
        "events": settings.events,
        "clients": settings.clients,
        "shape": settings.shape,
        "data_bytes": settings.data_bytes,
        "live_format": settings.live_format,
        "group": settings.group if settings.live_format == "v2" else 1,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_1m": round(os.getloadavg()[0], 2)},
        "results": results,
    }


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(RelayBenchSettings, argv)
    report = run(settings)
    if settings.json_output:
        print(orjson.dumps(report).decode())
        return 0
    print(f"relay bench: {report['events']} events, {report['clients']} clients, shape "
          f"{report['shape']} (cpus {report['machine']['cpus']}, "
          f"load {report['machine']['loadavg_1m']})")
    for row in report["results"]:
        extra = "".join(f"  {key} {row[key]}" for key in ("ratio", "cpu_ratio",
                                                          "cpu_ratio_vs_picows") if key in row)
        print(f"  {row['server']:11} {row['events_per_s']:>9,} events/s  "
              f"{row['frames_per_s']:>9,} frames/s  {row['frames_per_cpu_s']} frames/CPU-s  "
              f"missed {row['missed']}{extra}")
    return 0
