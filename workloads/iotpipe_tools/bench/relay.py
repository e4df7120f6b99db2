"""``iotpipe bench relay``: live events/s from a PUB socket to WebSocket clients.

The same load goes, in the same run, to two servers in their own processes:

* ``bare``: the plainest lossless fan-out: a SUB socket read in bursts, each reading's
  bytes appended to every client's unbounded queue, one sender task per client awaiting
  ``send``. No decoding, no filtering, no bound, no gap accounting.
* ``relay``: a real ``iotpipe relay`` (clients subscribed by prefix, JSON reading frames).

A publisher thread sends ``--events`` live events as fast as it can; ``--clients``
WebSocket clients in this process count what they receive. ``events_per_s`` is events
delivered to every client per second of wall time (publish start to the last client's last
event); ``frames_per_s`` multiplies by the number of clients; ``ratio`` is relay / bare.
The clients share the machine with the server, so on a 2-core box both numbers are a
lower bound on what the server alone could do.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import orjson
import zmq
from pydantic import Field
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from iotpipe.settings import TierSettings, parse_settings, tier_config
from iotpipe.wire import encode_live, encode_reading
from iotpipe_tools.ports import free_port
from iotpipe_tools.processes import stop
from iotpipe_tools.waiting import exited, wait_port, wait_ready

__all__ = ["RelayBenchSettings", "bare_relay", "main"]

_WARM_DEVICE = "warm-0"


class RelayBenchSettings(TierSettings):
    """Live events/s through iotpipe relay vs a bare SUB -> broadcast server, same run."""

    model_config = tier_config("iotpipe bench relay", "IOTPIPE_BENCH_RELAY_",
                               {"json_output": "json"})

    events: int = Field(50_000, ge=1, description="live events published per server")
    clients: int = Field(4, ge=1, description="WebSocket clients, each receiving every event")
    data_bytes: int = Field(64, ge=2, description="approximate size of each reading's data JSON")
    json_output: bool = Field(False, description="print one JSON object")


def bare_relay(port: int, pub_endpoint: str) -> None:
    """The baseline server: SUB -> per-client unbounded queue -> send of the raw bytes."""
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
        queues[connection] = (queue, wake)
        task = asyncio.create_task(sender(connection, queue, wake))
        try:
            await connection.wait_closed()
        finally:
            queues.pop(connection, None)
            task.cancel()

    async def run() -> None:
        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub_endpoint)
        loop = asyncio.get_running_loop()
        noblock = int(zmq.NOBLOCK)

        def drain() -> None:
            more = True
            for _ in range(512):
                try:
                    frames = sub.recv_multipart(noblock)
                except zmq.Again:
                    more = False
                    break
                for queue, _wake in queues.values():
                    queue.append(frames[2])
            for _queue, wake in queues.values():
                wake.set()
            if more:
                loop.call_soon(drain)

        loop.add_reader(sub.getsockopt(zmq.FD), drain)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        async with serve(handler, "127.0.0.1", port, compression=None):
            await stop.wait()

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())


def _events(count: int, data_bytes: int) -> list[list[bytes]]:
    pad = "x" * max(0, data_bytes - 24)
    data = orjson.dumps({"t": 21.5, "s": pad})
    now = time.time_ns()
    return [encode_live(f"dev-{i % 100}", "bench", i + 1,
                        encode_reading(f"dev-{i % 100}", str(i), now + i, data, now + i))
            for i in range(count)]


async def _client(url: str, subscribe: bool, expected: int, ready: asyncio.Event,
                  done_at: list[float], gaps: list[int]) -> None:
    async with connect(url, max_queue=4096, compression=None, open_timeout=10) as ws:
        if subscribe:
            await ws.send('{"op":"subscribe","prefixes":["dev-","warm-"]}')
            await ws.recv()
        warm = _WARM_DEVICE.encode()
        received = 0
        while True:
            # decode=False: text frames stay bytes, so the client pays no UTF-8 decoding.
            raw = await ws.recv(decode=False)
            if warm in raw:
                ready.set()
                continue
            if raw.startswith(b'{"event":"gap"'):
                gaps.append(int(orjson.loads(raw)["missed"]))
                continue
            received += 1
            if received + sum(gaps) >= expected:
                done_at.append(time.perf_counter())
                return


def _publish(pub: zmq.Socket[bytes], events: list[list[bytes]], started: list[float]) -> None:
    started.append(time.perf_counter())
    for frames in events:
        pub.send_multipart(frames)


async def _measure(url: str, subscribe: bool, pub: zmq.Socket[bytes],
                   events: list[list[bytes]], clients: int) -> dict[str, Any]:
    readies = [asyncio.Event() for _ in range(clients)]
    done_at: list[float] = []
    gaps: list[list[int]] = [[] for _ in range(clients)]
    tasks = [asyncio.create_task(_client(url, subscribe, len(events), readies[i], done_at,
                                         gaps[i])) for i in range(clients)]
    # PUB/SUB joins asynchronously: warm up until every client has seen an event.
    warm_seq = 0
    deadline = time.monotonic() + 30
    while not all(r.is_set() for r in readies):
        if time.monotonic() > deadline:
            raise RuntimeError("clients never received warm-up events")
        warm_seq += 1
        pub.send_multipart(encode_live(_WARM_DEVICE, "warm", warm_seq,
                                       encode_reading(_WARM_DEVICE, "w", 1, b"{}", 1)))
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # let in-flight warm-up events arrive first
    started: list[float] = []
    await asyncio.to_thread(_publish, pub, events, started)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=300)
    elapsed = max(done_at) - started[0]
    missed = sum(sum(g) for g in gaps)
    return {
        "events_per_s": round(len(events) / elapsed),
        "frames_per_s": round(len(events) * clients / elapsed),
        "missed": missed,
        "seconds": round(elapsed, 3),
    }


def run(settings: RelayBenchSettings) -> dict[str, Any]:
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)  # never drop in the publisher: measure the servers
    pub.setsockopt(zmq.LINGER, 0)
    pub_port = pub.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{pub_port}"
    events = _events(settings.events, settings.data_bytes)
    results: list[dict[str, Any]] = []
    try:
        for server in ("bare", "relay"):
            port = free_port()
            if server == "bare":
                proc = subprocess.Popen(
                    [sys.executable, "-c", "import sys; from iotpipe_tools.bench.relay import "
                     "bare_relay; bare_relay(int(sys.argv[1]), sys.argv[2])",
                     str(port), endpoint])
                wait_port(port, 30, abort=exited(proc, "bare relay"))
            else:
                metrics_port = free_port()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "iotpipe.cli", "relay", "--host", "127.0.0.1",
                     "--port", str(port), "--metrics-port", str(metrics_port),
                     "--middle-pub-endpoints", endpoint, "--insecure-no-auth",
                     "--registry-file", os.devnull, "--client-queue",
                     str(settings.events + 100), "--sub-hwm", str(10**9),
                     "--log-level", "warning"])
                wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", 30,
                           what="the relay to be ready", abort=exited(proc, "relay"))
            try:
                result = asyncio.run(_measure(f"ws://127.0.0.1:{port}/v1/live",
                                              server == "relay", pub, events, settings.clients))
            finally:
                stop(proc, timeout=15)
            results.append({"server": server, **result})
    finally:
        pub.close(0)
        context.term()
    bare, relay = results
    relay["ratio"] = round(relay["events_per_s"] / bare["events_per_s"], 3)
    return {
        "bench": "relay",
        "events": settings.events,
        "clients": settings.clients,
        "data_bytes": settings.data_bytes,
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
    print(f"relay bench: {report['events']} events to {report['clients']} clients "
          f"(cpus {report['machine']['cpus']}, load {report['machine']['loadavg_1m']})")
    for row in report["results"]:
        extra = f"  ratio {row['ratio']}" if "ratio" in row else ""
        print(f"  {row['server']:6} {row['events_per_s']:>9,} events/s  "
              f"{row['frames_per_s']:>9,} frames/s  missed {row['missed']}{extra}")
    return 0

