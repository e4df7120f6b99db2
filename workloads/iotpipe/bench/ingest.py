"""``iotpipe bench ingest``: ingest acks/s against a bare WebSocket server, same run, same load.

Two servers get the same client load from ``iotpipe simulate`` (its own process):

- **bare**: a websockets server that parses each JSON frame and acks its ids, storing
  nothing (the ceiling for one Python process: the cost of WebSockets + JSON alone);
- **ingest**: the real ``iotpipe ingest`` (token auth, validation, durable queue append
  with group commit, ack after fdatasync, forwarder) with a fake middle in this process
  that acks every batch.

Each server runs in its own process; the report gives acks/s for both and
``ratio = ingest / bare`` (target: >= 0.85), plus ack latency percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

import orjson
import zmq
from pydantic import Field

from iotpipe.bench.ports import free_port
from iotpipe.settings import TierSettings, parse_settings, tier_config
from iotpipe.wire import KIND_BATCH, decode_batch, encode_ack

__all__ = ["main"]

BENCH_SECRET = "iotpipe-bench-secret-not-for-production-use"


class IngestBenchSettings(TierSettings):
    """Measure ingest acks/s against a bare WebSocket server under the same load."""

    model_config = tier_config("iotpipe bench ingest", "IOTPIPE_BENCH_INGEST_",
                               {"json_output": "json"})

    connections: int = Field(1000, ge=1, description="simulated devices")
    duration: float = Field(10.0, gt=0, description="seconds of load per server")
    batch: int = Field(1, ge=1, description="messages per frame")
    inflight: int = Field(2, ge=1, description="unacked frames per device")
    size: int = Field(64, ge=16, description="approximate JSON bytes per message")
    processes: int = Field(1, ge=1, description="ingest processes (SO_REUSEPORT)")
    json_output: bool = Field(False, description="print one JSON object")


class _AckingMiddle:
    """A ROUTER in a thread that acks every batch at once (no storage)."""

    def __init__(self) -> None:
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.records = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            frames = self._sock.recv_multipart()
            if len(frames) > 2 and frames[1] == KIND_BATCH:
                batch = decode_batch(frames[1:])
                self.records += len(batch.readings)
                self._sock.send_multipart([frames[0], *encode_ack(batch.node, batch.last)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close(0)
        self._context.term()


# -- the bare baseline server --------------------------------------------------------------


async def _bare_handler(ws: Any) -> None:
    outbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)

    async def sender() -> None:
        while True:
            await ws.send(await outbox.get(), text=True)

    task = asyncio.create_task(sender())
    try:
        while True:
            doc = orjson.loads(await ws.recv(decode=False))
            messages = doc if isinstance(doc, list) else [doc]
            await outbox.put(orjson.dumps({"type": "ack", "ids": [m["id"] for m in messages]}))
    except Exception:  # the connection closed: nothing to report in a baseline
        pass
    finally:
        task.cancel()


async def _bare_serve(port: int) -> None:
    from websockets.asyncio.server import serve

    async with serve(_bare_handler, "127.0.0.1", port, compression=None, max_size=1 << 20):
        await asyncio.Future()


def _bare_main(port: int) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_bare_serve(port))


# -- driver --------------------------------------------------------------------------------


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


def _wait_ready(metrics_port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        url = f"http://127.0.0.1:{metrics_port}/readyz"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1):
            return
        time.sleep(0.05)
    raise TimeoutError(f"ingest not ready after {timeout}s")


def _simulate(settings: IngestBenchSettings, port: int) -> dict[str, Any]:
    args = [
        sys.executable, "-m", "iotpipe.cli", "simulate", "--json",
        "--url", f"ws://127.0.0.1:{port}/v1/ingest", "--secret", BENCH_SECRET,
        "--connections", str(settings.connections), "--duration", str(settings.duration),
        "--batch", str(settings.batch), "--inflight", str(settings.inflight),
        "--size", str(settings.size), "--ack-timeout", "30",
    ]
    done = subprocess.run(args, capture_output=True, text=True,
                          timeout=settings.duration + 180)
    if not done.stdout.strip():
        raise RuntimeError(f"simulate failed: {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its direct children (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[1] is the ppid; [11] utime, [12] stime (after the "(comm)" part).
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _measure(settings: IngestBenchSettings, port: int, pid: int) -> dict[str, Any]:
    """Run the load; add the server's CPU seconds and acks per server CPU second."""
    before = _cpu_seconds(pid)
    result = _simulate(settings, port)
    cpu = _cpu_seconds(pid) - before
    result["server_cpu_s"] = round(cpu, 2)
    result["acks_per_server_cpu_s"] = round(result["acked"] / cpu, 1) if cpu else None
    return result


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def run_bench(settings: IngestBenchSettings) -> dict[str, Any]:
    env = {**os.environ, "IOTPIPE_AUTH_SECRET": BENCH_SECRET}
    results: dict[str, Any] = {}
    port = free_port()
    bare = subprocess.Popen(
        [sys.executable, "-c", f"from iotpipe.bench.ingest import _bare_main; _bare_main({port})"],
        env=env)
    try:
        _wait_port(port, 20)
        results["bare"] = _measure(settings, port, bare.pid)
    finally:
        _stop(bare)

    middle = _AckingMiddle()
    with tempfile.TemporaryDirectory(prefix="iotpipe-bench-ingest-") as data_dir:
        port, metrics_port = free_port(), free_port()
        ingest = subprocess.Popen(
            [sys.executable, "-m", "iotpipe.cli", "ingest", "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", str(metrics_port), "--data-dir", data_dir,
             "--node-id", "bench", "--middle-endpoints", middle.endpoint,
             "--rate-limit", "0", "--processes", str(settings.processes),
             "--log-level", "warning"],
            env=env)
        try:
            _wait_ready(metrics_port, 30)
            results["ingest"] = _measure(settings, port, ingest.pid)
        finally:
            _stop(ingest)  # SIGTERM drains: everything acked reaches the middle first
            middle.close()
        results["ingest"]["drain_exit_code"] = ingest.returncode
        results["ingest"]["middle_records"] = middle.records
    # Steady state (every device connected) when the run was long enough to have one.
    bare_rate = results["bare"]["steady_acks_per_s"] or results["bare"]["acks_per_s"]
    ingest_rate = results["ingest"]["steady_acks_per_s"] or results["ingest"]["acks_per_s"]
    return {
        "bench": "ingest",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "load": {"connections": settings.connections, "duration_s": settings.duration,
                 "batch": settings.batch, "inflight": settings.inflight,
                 "size": settings.size, "ingest_processes": settings.processes},
        "results": results,
        "bare_acks_per_s": bare_rate,
        "ingest_acks_per_s": ingest_rate,
        "ratio": round(ingest_rate / bare_rate, 3) if bare_rate else None,
        # When the load generator, not the server, is the limit, acks/s ratios tend to 1;
        # acks per server CPU second shows the server's own cost either way.
        "cpu_efficiency_ratio": _ratio(results["ingest"]["acks_per_server_cpu_s"],
                                       results["bare"]["acks_per_server_cpu_s"]),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(IngestBenchSettings, argv)
    report = run_bench(settings)
    if settings.json_output:
        print(json.dumps(report))
    else:
        for name in ("bare", "ingest"):
            r = report["results"][name]
            rate = r["steady_acks_per_s"] or r["acks_per_s"]
            print(f"{name:>7}: {rate:>10.1f} acks/s  p50 {r['ack_latency_ms']['p50']}"
                  f" ms  p99 {r['ack_latency_ms']['p99']} ms  server CPU {r['server_cpu_s']} s"
                  f" ({r['acks_per_server_cpu_s']} acks/CPU-s)  ok={r['ok']}")
        print(f"  ratio: {report['ratio']}  (per CPU second: {report['cpu_efficiency_ratio']})")
    ok = report["results"]["bare"]["ok"] and report["results"]["ingest"]["ok"]
    return 0 if ok else 1
