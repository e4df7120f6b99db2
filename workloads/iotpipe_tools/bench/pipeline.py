"""``iotpipe bench pipeline``: devices to a live client and to the store of record through
all four tiers, at a fixed rate.

``iotpipe up`` runs middle, storage (SQLite store of record), relay and ingest in a
temporary directory on free ports. The picows load generator sends ``--rate`` messages/s
in total (open loop, default 5,000) from ``--connections`` devices, each message stamped
with its send time in ``ts``. Meanwhile, in this process:

- a relay client subscribed to every device measures device-to-client latency
  (``e2e_p50_ms`` / ``e2e_p99_ms``: arrival time minus ``ts``);
- a poller reads the rows the store of record gained every ``--poll-ms`` and measures
  device-to-store latency (``stored_p50_ms`` / ``stored_p99_ms``; resolution: the poll
  interval).

Only messages sent in the measured window count. ``ack_p99_ms`` is the device's own ack
latency; ``pipeline_cpu_pct`` the CPU of all four tiers together (percent of one core).
``middle_limit_ratio`` comes from ``iotpipe bench middle`` in the same run: the middle
tier's records/s against a bare acking ROUTER on the same batches (``--middle-batch``,
default 64; the issue's goal is 0.7).
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import Field
from websockets.exceptions import ConnectionClosedOK
from websockets.sync.client import connect

from iotpipe.auth import CLIENT_AUDIENCE, issue_token
from iotpipe.settings import TierSettings, parse_settings, tier_config
from iotpipe_tools.bench.loadgen import LoadSpec, run
from iotpipe_tools.ports import free_port_block
from iotpipe_tools.processes import cpu_seconds, stop
from iotpipe_tools.waiting import exited, wait_ready

__all__ = ["main", "run_bench"]

PORTS = 9  # iotpipe up --base-port B uses B..B+8


class PipelineBenchSettings(TierSettings):
    """Device-to-client and device-to-store latency through all four tiers at a fixed rate."""

    model_config = tier_config("iotpipe bench pipeline", "IOTPIPE_BENCH_PIPELINE_",
                               {"json_output": "json"})

    rate: float = Field(5000.0, gt=0, description="messages/s in total")
    connections: int = Field(200, ge=1, description="device connections")
    size: int = Field(128, ge=48, description="approximate JSON bytes per message")
    duration: float = Field(10.0, gt=0, description="measured seconds")
    warmup: float = Field(2.0, ge=0, description="seconds of load before measuring")
    settle: float = Field(10.0, ge=0, description="seconds to wait for the last readings "
                                                  "to reach the client and the store")
    poll_ms: float = Field(20.0, gt=0, description="store poll interval (its resolution)")
    middle_batch: int = Field(64, ge=1, description="batch size for middle_limit_ratio "
                                                    "(0 ratio run: see --middle-ratio)")
    middle_ratio: bool = Field(True, description="measure middle_limit_ratio (bench middle)")
    json_output: bool = Field(False, description="print one JSON object")


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)  # noqa: E731
    return pick(0.5), pick(0.99)


class _Window:
    """The measured window in epoch nanoseconds (set by the load generator's clock)."""

    def __init__(self) -> None:
        self.start_ns = 0
        self.end_ns = 1 << 62

    def latencies_ms(self, samples: list[tuple[int, int]]) -> list[float]:
        """Of the messages sent inside the window (filtered once the window is over)."""
        start, end = self.start_ns, self.end_ns
        return [(seen - ts) / 1e6 for ts, seen in samples if start <= ts <= end]


class _RelayClient(threading.Thread):
    def __init__(self, url: str, token: str, stop_flag: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.stop_flag = url, token, stop_flag
        self.samples: list[tuple[int, int]] = []  # (ts, arrival) in epoch nanoseconds
        self.readings = 0
        self.gaps = 0
        self.subscribed = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            with connect(self.url, additional_headers={"Authorization": f"Bearer {self.token}"},
                         max_size=1 << 22) as ws:
                ws.send(orjson.dumps({"op": "subscribe", "all": True}).decode())
                while not self.stop_flag.is_set():
                    try:
                        frame = ws.recv(timeout=0.5)
                    except TimeoutError:
                        continue
                    now = time.time_ns()
                    event = orjson.loads(frame)
                    kind = event.get("event")
                    if kind == "subscribed":
                        self.subscribed.set()
                    elif kind == "reading":
                        self.readings += 1
                        self.samples.append((event["ts"], now))
                    elif kind == "gap":
                        self.gaps += 1
        except ConnectionClosedOK:
            # The relay says "going away" (1001) when `iotpipe up` stops at the end of the
            # run, possibly before this thread saw the stop flag: only an error before then
            # is one.
            if not self.stop_flag.is_set():
                self.error = "the relay closed the connection during the run"
            self.subscribed.set()
        except Exception as exc:  # reported, not raised: the bench says what failed
            self.error = repr(exc)
            self.subscribed.set()


class _StorePoller(threading.Thread):
    def __init__(self, db: Path, poll_s: float, stop_flag: threading.Event) -> None:
        super().__init__(daemon=True)
        self.db, self.poll_s, self.stop_flag = db, poll_s, stop_flag
        self.samples: list[tuple[int, int]] = []  # (ts, seen in the store) in epoch ns
        self.rows = 0

    def run(self) -> None:
        while not self.db.exists() and not self.stop_flag.is_set():
            time.sleep(self.poll_s)
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)
        last = 0
        try:
            while not self.stop_flag.is_set():
                try:
                    rows = conn.execute("SELECT rowid, ts_ns FROM readings WHERE rowid > ? "
                                        "ORDER BY rowid", (last,)).fetchall()
                except sqlite3.OperationalError:  # table not created yet, or busy
                    rows = []
                now = time.time_ns()
                for rowid, ts_ns in rows:
                    last = max(last, rowid)
                    self.rows += 1
                    self.samples.append((ts_ns, now))
                time.sleep(self.poll_s)
        finally:
            conn.close()


def _middle_limit(batch: int) -> dict[str, Any]:
    """``iotpipe bench middle`` at one batch size: the middle's records/s, a bare acking
    ROUTER's on the same batches, and their ratio."""
    done = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "bench", "middle", "--json", "--batches",
         str(batch), "--seconds", "2", "--warmup", "0.5"],
        capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not done.stdout.strip():
        return {"ratio": None}
    row = json.loads(done.stdout)["results"][0]
    return {"ratio": row.get("ratio"), "batch": batch,
            "middle_records_per_s": row.get("records_per_s"),
            "bare_router_records_per_s": row.get("bare_records_per_s"),
            "middle_records_per_cpu_s": row.get("records_per_cpu_s")}


def run_bench(settings: PipelineBenchSettings) -> dict[str, Any]:
    base = free_port_block(PORTS)
    with tempfile.TemporaryDirectory(prefix="iotpipe-bench-pipeline-") as tmp:
        data = Path(tmp)
        up = subprocess.Popen(
            [sys.executable, "-m", "iotpipe.cli", "up", "--data-dir", str(data),
             "--base-port", str(base), "--log-level", "warning"],
            stdout=subprocess.DEVNULL)
        window = _Window()
        stop_flag = threading.Event()
        try:
            for offset in range(5, 9):  # ingest, middle, storage, relay metrics
                wait_ready(f"http://127.0.0.1:{base + offset}/readyz", 90,
                           abort=exited(up, "iotpipe up"))
            secret = (data / "auth.secret").read_text().strip()
            relay = _RelayClient(f"ws://127.0.0.1:{base + 1}/v1/live",
                                 issue_token(secret.encode(), "bench", CLIENT_AUDIENCE, 3600),
                                 stop_flag)
            relay.start()
            relay.subscribed.wait(30)
            poller = _StorePoller(data / "store" / "readings.db", settings.poll_ms / 1000,
                                  stop_flag)
            poller.start()
            spec = LoadSpec(url=f"ws://127.0.0.1:{base}/v1/ingest", secret=secret,
                            connections=settings.connections, mode="open", rate=settings.rate,
                            size=settings.size, duration=settings.duration,
                            warmup=settings.warmup, stamp=True, device_prefix="pipe-")

            def probe() -> float:  # the window's edges, on the generator's clock
                if window.start_ns == 0:
                    window.start_ns = time.time_ns()
                else:
                    window.end_ns = time.time_ns()
                return cpu_seconds(up.pid)  # up and its tiers (threads included)

            load = run(spec, probe)
            deadline = time.monotonic() + settings.settle
            sent_in_window = load.get("sent", 0)
            while time.monotonic() < deadline and (
                    len(window.latencies_ms(poller.samples)) < sent_in_window
                    or len(window.latencies_ms(relay.samples)) < sent_in_window):
                time.sleep(0.2)
        finally:
            stop_flag.set()
            stop(up)
    relay_ms = window.latencies_ms(relay.samples)
    stored_ms = window.latencies_ms(poller.samples)
    e2e = _percentiles(relay_ms)
    stored = _percentiles(stored_ms)
    measured = load.get("measured_s") or 0
    cpu = load.get("server_cpu_s") or 0
    middle = _middle_limit(settings.middle_batch) if settings.middle_ratio else {"ratio": None}
    return {
        "bench": "pipeline",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg": os.getloadavg()[0]},
        "load": {"rate": settings.rate, "connections": settings.connections,
                 "size": settings.size, "duration_s": settings.duration},
        "acked_per_s": load.get("acked_per_s"),
        "sent_in_window": load.get("sent", 0),
        "acked_in_window": load.get("acked", 0),
        "ack_p99_ms": load.get("p99_ms"),
        "relay_readings_in_window": len(relay_ms),
        "relay_gaps": relay.gaps,
        "relay_error": relay.error,
        "stored_in_window": len(stored_ms),
        "window_s": round((window.end_ns - window.start_ns) / 1e9, 3),
        "e2e_p50_ms": e2e[0],
        "e2e_p99_ms": e2e[1],
        "stored_p50_ms": stored[0],
        "stored_p99_ms": stored[1],
        "pipeline_cpu_pct": round(100 * cpu / measured, 1) if measured else None,
        "up_exit_code": up.returncode,
        "middle_limit_ratio": middle["ratio"],
        "middle_limit": middle,
    }


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(PipelineBenchSettings, argv)
    report = run_bench(settings)
    if settings.json_output:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            if key not in ("machine", "load", "bench"):
                print(f"{key}: {value}")
    ok = (report["relay_error"] is None and report["acked_in_window"] > 0
          and report["stored_in_window"] > 0 and report["up_exit_code"] == 0)
    return 0 if ok else 1
