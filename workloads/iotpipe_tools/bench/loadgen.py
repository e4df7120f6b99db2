"""A cheap device load generator for the benchmarks (picows client, one process).

``iotpipe simulate`` checks every ack the way firmware should; it is built on websockets
and costs about as much CPU per message as the server it measures. On a 2-core machine
that hides the server's own cost, so ``bench ingest`` and ``bench connections`` drive the
servers with this generator instead: one picows connection per device, one message per
frame, JSON acks matched to send times.

Modes:

- ``closed``: each connection keeps ``inflight`` frames unacked (a new one per ack): the
  server's maximum rate;
- ``open``: ``rate`` messages/s in total, scheduled every 5 ms round-robin over the
  connections whatever the acks do; latency counts from the scheduled send time, so a
  server that falls behind shows it (no coordinated omission);
- ``idle``: connections are opened and held (keepalive answered by picows), then one
  message is sent on each (``bench connections``).

Run as ``python -m iotpipe_tools.bench.loadgen JSON-ARGS``; prints one JSON line.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from iotpipe.auth import DEVICE_AUDIENCE, issue_token
from iotpipe_tools.sources import PORTS_PER_SOURCE, bound_socket, raise_nofile

__all__ = ["LoadSpec", "drive", "run"]

TICK_S = 0.005


@dataclass
class LoadSpec:
    url: str
    secret: str
    connections: int = 200
    mode: str = "closed"          # closed | open | idle
    inflight: int = 4
    size: int = 128
    duration: float = 5.0
    warmup: float = 1.0
    rate: float = 0.0             # open mode: messages/s in total
    hold: float = 2.0             # idle mode: seconds to hold before the one message each
    connect_concurrency: int = 512
    device_prefix: str = "lg-"
    stamp: bool = False           # put the send time in "ts" (end-to-end latency downstream)
    source_offset: int = 0        # first source address is 127.0.0.(2 + source_offset)
    handshake: bool = False       # idle mode: print "held N", wait for a line on stdin


class _Stats:
    def __init__(self) -> None:
        self.measuring = False
        self.acked = 0
        self.acked_measured = 0
        self.sent_measured = 0
        self.errors = 0
        self.latencies: list[float] = []

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)


class _Device(WSListener):  # type: ignore[misc]
    def __init__(self, gen: _Generator) -> None:
        super().__init__()
        self.gen = gen
        self.transport: WSTransport | None = None
        self.next_id = 1
        self.sent: dict[int, float] = {}
        self.closed = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True

    def send(self, scheduled: float) -> None:
        msg_id = self.next_id
        self.next_id += 1
        self.sent[msg_id] = scheduled
        stats = self.gen.stats
        if stats.measuring:
            stats.sent_measured += 1
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, self.gen.body(msg_id))

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return
        reply = orjson.loads(frame.get_payload_as_bytes())
        gen = self.gen
        stats = gen.stats
        if reply.get("type") != "ack":
            stats.errors += 1
            return
        now = time.monotonic()
        for msg_id in reply["ids"]:
            sent = self.sent.pop(msg_id, None)
            if sent is None:
                continue
            stats.acked += 1
            if stats.measuring:
                stats.acked_measured += 1
                latencies = stats.latencies
                if len(latencies) < 200_000:
                    latencies.append(now - sent)
                elif random.random() < 0.1:
                    latencies[random.randrange(200_000)] = now - sent
            if gen.closed_loop and gen.sending:
                self.send(now)


class _Generator:
    def __init__(self, spec: LoadSpec, probe: Callable[[], float] | None = None,
                 on_hold: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.on_hold = on_hold
        self.probe = probe  # read at the window's edges (the server's CPU seconds)
        self.stats = _Stats()
        self.closed_loop = spec.mode == "closed"
        self.sending = True
        self.devices: list[_Device] = []
        self._scheduler: asyncio.Task[None] | None = None
        pad = max(0, spec.size - 48)
        self._prefix = b'{"id":'
        self._suffix = b',"data":{"v":21.5,"p":"' + b"x" * pad + b'"}}'

    def body(self, msg_id: int) -> bytes:
        if self.spec.stamp:  # seconds with microseconds: ingest keeps them exactly
            return (self._prefix + str(msg_id).encode() + b',"ts":'
                    + f"{time.time():.6f}".encode() + self._suffix)
        return self._prefix + str(msg_id).encode() + self._suffix

    async def connect_all(self) -> tuple[list[_Device], float, int]:
        spec = self.spec
        sources = [f"127.0.0.{2 + spec.source_offset + i}"
                   for i in range(max(1, -(-spec.connections // PORTS_PER_SOURCE)))]
        secret = spec.secret.encode()
        gate = asyncio.Semaphore(spec.connect_concurrency)
        devices = self.devices
        failed = 0

        async def one(index: int) -> None:
            nonlocal failed
            token = issue_token(secret, f"{spec.device_prefix}{index}", DEVICE_AUDIENCE, 86400)
            async with gate:
                try:
                    _, device = await ws_connect(
                        lambda *_: _Device(self), spec.url,
                        extra_headers={"Authorization": f"Bearer {token}"},
                        socket_factory=lambda _url: bound_socket(sources[index % len(sources)]),
                        read_buffer_init_size=2048, websocket_handshake_timeout=60,
                        enable_auto_pong=True)
                except Exception:  # counted: a bench reports how many were held
                    failed += 1
                    return
                if device is None:  # seen under overload: the connection was lost meanwhile
                    failed += 1
                    return
                devices.append(device)

        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(spec.connections)))
        return devices, time.monotonic() - start, failed

    async def run(self) -> dict[str, Any]:
        spec = self.spec
        raise_nofile(2 * spec.connections + 4096)
        gc.freeze()  # tens of thousands of long-lived objects: keep the GC off them
        devices, connect_s, failed = await self.connect_all()
        result: dict[str, Any] = {"connections": len(devices), "connect_failed": failed,
                                  "connect_s": round(connect_s, 2)}
        if not devices:
            return result
        loop = asyncio.get_running_loop()
        stats = self.stats
        if spec.mode == "idle":
            await asyncio.sleep(spec.hold)
            held = sum(1 for d in devices if not d.closed)
            if self.on_hold is not None:
                self.on_hold()
            if spec.handshake:  # a driver process measures now, then says go
                print(f"held {held}", flush=True)
                await loop.run_in_executor(None, sys.stdin.readline)
                held = sum(1 for d in devices if not d.closed)
            stats.measuring = True
            start = time.monotonic()
            for device in devices:
                if not device.closed:
                    device.send(time.monotonic())
            deadline = start + max(30.0, spec.duration)
            while stats.acked < held and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a counter
                await asyncio.sleep(0.05)
            result.update(held=held, acked=stats.acked, errors=stats.errors,
                          send_to_last_ack_s=round(time.monotonic() - start, 2),
                          p50_ms=stats.percentile(0.5), p99_ms=stats.percentile(0.99))
            return result
        if self.closed_loop:
            now = time.monotonic()
            for device in devices:
                for _ in range(spec.inflight):
                    device.send(now)
        else:
            self._scheduler = loop.create_task(self._open_loop(devices))
        await asyncio.sleep(spec.warmup)
        cpu_before = self.probe() if self.probe else 0.0
        stats.measuring = True
        started = time.monotonic()
        await asyncio.sleep(spec.duration)
        elapsed = time.monotonic() - started
        stats.measuring = False
        self.sending = False
        if self.probe:
            result["server_cpu_s"] = self.probe() - cpu_before
        result.update(acked=stats.acked_measured, sent=stats.sent_measured,
                      measured_s=round(elapsed, 3),
                      acked_per_s=round(stats.acked_measured / elapsed, 1),
                      errors=stats.errors, p50_ms=stats.percentile(0.5),
                      p99_ms=stats.percentile(0.99),
                      still_open=sum(1 for d in devices if not d.closed))
        return result

    async def _open_loop(self, devices: list[_Device]) -> None:
        spec = self.spec
        per_tick = spec.rate * TICK_S
        owed = 0.0
        index = 0
        tick = time.monotonic()
        while self.sending:
            tick += TICK_S
            delay = tick - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            owed += per_tick
            count = int(owed)
            owed -= count
            for _ in range(count):
                device = devices[index % len(devices)]
                index += 1
                if not device.closed:
                    device.send(tick)


async def drive(spec: LoadSpec, probe: Callable[[], float] | None = None,
                on_hold: Callable[[], None] | None = None) -> dict[str, Any]:
    """Drive the load; ``probe`` (e.g. a server's CPU seconds) is read at the edges of
    the measured window and its difference reported as ``server_cpu_s``; ``on_hold`` is
    called in idle mode once the connections were held, before the messages go."""
    generator = _Generator(spec, probe, on_hold)
    try:
        return await generator.run()
    finally:
        generator.sending = False
        for device in generator.devices:
            if device.transport is not None:
                device.transport.disconnect()
        await asyncio.sleep(0.2)  # let the hang-ups leave before the loop closes


def run(spec: LoadSpec, probe: Callable[[], float] | None = None,
        on_hold: Callable[[], None] | None = None) -> dict[str, Any]:
    """``drive`` on a fresh event loop (uvloop where installed, as the servers use)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(drive(spec, probe, on_hold))


def main() -> None:
    print(json.dumps(run(LoadSpec(**json.loads(sys.argv[1])))), flush=True)


if __name__ == "__main__":
    main()
