"""``iotpipe bench ingest``: durable acks per server CPU-second against two bare fronts.

Three servers, each in its own process, get the same load from the same generator
(``iotpipe_tools.bench.loadgen``, a picows client in this process) one after the other:

- **picows**: a bare picows server that parses each JSON frame and acks its ids, storing
  nothing (the cheapest Python WebSocket front; the issue's yardstick);
- **websockets**: the same bare server on websockets;
- **ingest**: the real ``iotpipe ingest`` (token auth, validation, durable queue append with
  group commit, ack after fdatasync, forwarder) with an acking fake middle in a process.

Closed loop first (``--connections`` x ``--inflight`` frames unacked, one message each):
``acked_per_s``, ``server_cpu_pct`` (of one core, over the measured window only),
``acks_per_cpu_s``, ``p50_ms``, ``p99_ms`` for each, and ``cpu_ratio_vs_picows`` (acks per
CPU-second relative to the bare picows front of the same run; the issue's goal for ingest
is 0.7). Then open loop at half of ingest's measured maximum, every server at that same
rate: ``p99_ms_at_half`` (ingest's; goal 10 ms) and each server's CPU at that rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from pydantic import Field

from iotpipe.ingest.settings import DEFAULT_LISTEN_BACKLOG
from iotpipe.settings import TierSettings, parse_settings, tier_config
from iotpipe_tools.bench.loadgen import LoadSpec, run
from iotpipe_tools.ports import free_port
from iotpipe_tools.processes import cpu_seconds, stop
from iotpipe_tools.sources import raise_nofile
from iotpipe_tools.waiting import exited, wait_port, wait_ready

__all__ = ["main", "run_bench"]

BENCH_SECRET = "iotpipe-bench-secret-not-for-production-use"
SERVERS = ("picows", "websockets", "ingest")


class IngestBenchSettings(TierSettings):
    """Measure ingest's durable acks per CPU-second against bare picows and websockets
    fronts under the same load."""

    model_config = tier_config("iotpipe bench ingest", "IOTPIPE_BENCH_INGEST_",
                               {"json_output": "json"})

    connections: int = Field(200, ge=1, description="device connections")
    inflight: int = Field(4, ge=1, description="unacked frames per connection (closed loop)")
    size: int = Field(128, ge=48, description="approximate JSON bytes per message")
    duration: float = Field(5.0, gt=0, description="measured seconds per run")
    warmup: float = Field(1.0, ge=0, description="seconds of load before measuring")
    half_rate: bool = Field(True, description="also run open loop at half of ingest's "
                                                 "maximum rate (p99_ms_at_half)")
    processes: int = Field(1, ge=1, description="ingest processes (SO_REUSEPORT)")
    json_output: bool = Field(False, description="print one JSON object")


# -- the servers ---------------------------------------------------------------------------

# SIGINT stops it; a bench started in the background (nohup, &) hands its children SIGINT
# ignored, so the handler is installed again (else each stop waited 60 s, then killed it).
_MIDDLE = """
import signal, sys, zmq
from iotpipe.wire import BATCH_KINDS, decode_batch, encode_ack
signal.signal(signal.SIGINT, signal.default_int_handler)
ctx = zmq.Context(); sock = ctx.socket(zmq.ROUTER); sock.setsockopt(zmq.LINGER, 0)
sock.bind(sys.argv[1]); records = 0
try:  # "ready" inside: a SIGINT that arrives the moment it is printed still ends cleanly
    print("ready", flush=True)
    while True:
        frames = sock.recv_multipart()
        if len(frames) > 2 and frames[1] in BATCH_KINDS:
            batch = decode_batch(frames[1:]); records += len(batch.readings)
            sock.send_multipart([frames[0], *encode_ack(batch.node, batch.last)])
except KeyboardInterrupt:
    print(records, flush=True)
"""


def bare_picows_main(port: int, reuse_port: bool = False) -> None:
    """A bare picows front: parse each frame, ack its ids, store nothing."""
    from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

    class Listener(WSListener):  # type: ignore[misc]
        def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
            if frame.msg_type != WSMsgType.TEXT:
                if frame.msg_type == WSMsgType.CLOSE:
                    transport.disconnect()
                return
            doc = orjson.loads(frame.get_payload_as_bytes())
            messages = doc if isinstance(doc, list) else [doc]
            transport.send(WSMsgType.TEXT,
                           orjson.dumps({"type": "ack", "ids": [m["id"] for m in messages]}))

    async def serve() -> None:
        # The same listen backlog and read buffer as ingest's front (bench connections).
        server = await ws_create_server(lambda _request: Listener(), "127.0.0.1", port,
                                        backlog=DEFAULT_LISTEN_BACKLOG, read_buffer_init_size=4096,
                                        reuse_port=reuse_port or None)
        await server.serve_forever()

    raise_nofile(1 << 20)

    _run_forever(serve)


async def _bare_websockets_handler(ws: Any) -> None:
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


def bare_websockets_main(port: int) -> None:
    """A bare websockets front (a sender task per connection, as FIELD-NOTES found fastest)."""
    from websockets.asyncio.server import serve

    async def main() -> None:
        async with serve(_bare_websockets_handler, "127.0.0.1", port, compression=None,
                         max_size=1 << 20):
            await asyncio.Future()

    _run_forever(main)


def _run_forever(main: Callable[[], Any]) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# -- driver --------------------------------------------------------------------------------


class _Server:
    """One server process under test, started fresh for each run."""

    def __init__(self, name: str, settings: IngestBenchSettings, env: dict[str, str]) -> None:
        self.name = name
        self.settings = settings
        self.env = env
        self.port = free_port()
        self.extra: dict[str, Any] = {}
        self.ingest_args: list[str] = []  # more options for iotpipe ingest
        self._middle: subprocess.Popen[str] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[Any] | None = None
        self.more: list[subprocess.Popen[Any]] = []  # further bare picows processes

    def pids(self) -> list[int]:
        return [p.pid for p in [self.proc, *self.more] if p is not None]

    def start(self) -> None:
        py = sys.executable
        if self.name == "picows":
            # As many processes on one port (SO_REUSEPORT) as ingest runs (bench connections).
            count = self.settings.processes
            code = (f"from iotpipe_tools.bench.ingest import bare_picows_main; "
                    f"bare_picows_main({self.port}, {count > 1})")
            self.proc = subprocess.Popen([py, "-c", code], env=self.env)
            wait_port(self.port, 30, abort=exited(self.proc, self.name))
            self.more = [subprocess.Popen([py, "-c", code], env=self.env)
                         for _ in range(count - 1)]
            time.sleep(0.5 if self.more else 0)  # the others bind (nothing to poll per process)
            return
        if self.name == "websockets":
            code = (f"from iotpipe_tools.bench.ingest import bare_websockets_main; "
                    f"bare_websockets_main({self.port})")
            self.proc = subprocess.Popen([py, "-c", code], env=self.env)
            wait_port(self.port, 30, abort=exited(self.proc, self.name))
            return
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        self._middle = subprocess.Popen([py, "-c", _MIDDLE, endpoint], env=self.env,
                                        stdout=subprocess.PIPE, text=True)
        assert self._middle.stdout is not None
        self._middle.stdout.readline()  # "ready"
        self._tmp = tempfile.TemporaryDirectory(prefix="iotpipe-bench-ingest-")
        metrics_port = free_port()
        self.proc = subprocess.Popen(
            [py, "-m", "iotpipe.cli", "ingest", "--host", "127.0.0.1",
             "--port", str(self.port), "--metrics-port", str(metrics_port),
             "--data-dir", self._tmp.name, "--node-id", "bench",
             "--middle-endpoints", endpoint, "--rate-limit", "0",
             "--processes", str(self.settings.processes), "--log-level", "warning",
             *self.ingest_args],
            env=self.env)
        wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", 60, what="ingest to be ready",
                   abort=exited(self.proc, "ingest"))

    def stop(self) -> None:
        for extra in self.more:
            stop(extra)
        if self.proc is not None:
            stop(self.proc)  # ingest: SIGTERM drains everything acked to the middle first
            if self.name == "ingest":
                self.extra["drain_exit_code"] = self.proc.returncode
        if self._middle is not None:
            stop(self._middle, sig_int=True)
            assert self._middle.stdout is not None
            last = self._middle.stdout.read().strip().splitlines()
            self.extra["middle_records"] = int(last[-1]) if last and last[-1].isdigit() else None
        if self._tmp is not None:
            self._tmp.cleanup()


def _measure(name: str, settings: IngestBenchSettings, env: dict[str, str], mode: str,
             rate: float = 0.0) -> dict[str, Any]:
    server = _Server(name, settings, env)
    server.start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        spec = LoadSpec(url=f"ws://127.0.0.1:{server.port}/v1/ingest", secret=BENCH_SECRET,
                        connections=settings.connections, mode=mode,
                        inflight=settings.inflight, size=settings.size,
                        duration=settings.duration, warmup=settings.warmup, rate=rate)
        load = run(spec, lambda: cpu_seconds(pid))
    finally:
        server.stop()
    cpu = load.get("server_cpu_s") or 0.0
    measured = load.get("measured_s") or 0.0
    result = {
        "acked_per_s": load.get("acked_per_s", 0.0),
        "server_cpu_pct": round(100 * cpu / measured, 1) if measured else None,
        "acks_per_cpu_s": round(load["acked"] / cpu, 1) if cpu and "acked" in load else None,
        "p50_ms": load.get("p50_ms"),
        "p99_ms": load.get("p99_ms"),
        "acked": load.get("acked", 0),
        "errors": load.get("errors", 0),
        "connections": load.get("connections", 0),
    }
    result.update(server.extra)
    return result


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run_bench(settings: IngestBenchSettings) -> dict[str, Any]:
    env = {**os.environ, "IOTPIPE_AUTH_SECRET": BENCH_SECRET}
    results = {name: _measure(name, settings, env, "closed") for name in SERVERS}
    picows_eff = results["picows"]["acks_per_cpu_s"]
    for name in SERVERS:
        results[name]["cpu_ratio_vs_picows"] = _ratio(results[name]["acks_per_cpu_s"],
                                                      picows_eff)
    report: dict[str, Any] = {
        "bench": "ingest",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg": os.getloadavg()[0]},
        "load": {"connections": settings.connections, "inflight": settings.inflight,
                 "size": settings.size, "duration_s": settings.duration,
                 "ingest_processes": settings.processes, "generator": "picows, one process"},
        "results": results,
        "cpu_ratio_vs_picows": results["ingest"]["cpu_ratio_vs_picows"],
        "ingest_vs_websockets_cpu_ratio": _ratio(results["ingest"]["acks_per_cpu_s"],
                                                 results["websockets"]["acks_per_cpu_s"]),
    }
    if settings.half_rate and results["ingest"]["acked_per_s"]:
        rate = round(results["ingest"]["acked_per_s"] / 2, 1)
        half = {name: _measure(name, settings, env, "open", rate) for name in SERVERS}
        report["half_rate"] = {"rate": rate, **{
            name: {"acked_per_s": r["acked_per_s"], "server_cpu_pct": r["server_cpu_pct"],
                   "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]} for name, r in half.items()}}
        report["p99_ms_at_half"] = half["ingest"]["p99_ms"]
    return report


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(IngestBenchSettings, argv)
    report = run_bench(settings)
    if settings.json_output:
        print(json.dumps(report))
    else:
        for name in SERVERS:
            r = report["results"][name]
            print(f"{name:>10}: {r['acked_per_s']:>9.1f} acks/s  CPU {r['server_cpu_pct']}%"
                  f"  {r['acks_per_cpu_s']} acks/CPU-s (x{r['cpu_ratio_vs_picows']} of picows)"
                  f"  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms")
        if "half_rate" in report:
            half = report["half_rate"]
            print(f"open loop at {half['rate']} msgs/s: " + ", ".join(
                f"{n} CPU {half[n]['server_cpu_pct']}% p99 {half[n]['p99_ms']} ms"
                for n in SERVERS))
    results = report["results"]
    ok = all(r["acked"] > 0 and r["errors"] == 0 for r in results.values())
    ok = ok and results["ingest"].get("drain_exit_code") == 0
    return 0 if ok else 1
