"""``iotpipe bench connections``: how many idle devices one ingest process holds, and at what
memory cost, against a bare picows front holding the same number in the same run.

For each server (the bare picows front first, then the real ``iotpipe ingest`` with token
auth, its queue and an acking fake middle): open ``--connections`` device connections
(default 100,000) from 127.0.0.2, 127.0.0.3, ... (about 20k source ports each), with file
limits raised in both processes; hold them idle for ``--hold`` seconds while ingest's
keepalive pings them (``--ping-interval``); read the server's resident memory; then send
one message on every connection and count the acks (ingest acks only what is durable).

Fields per server: ``held``, ``rss_bytes``, ``bytes_per_connection`` (RSS growth over the
server's idle RSS, divided by ``held``), ``connect_s``, ``acked``, ``ack_s`` (first send to
last ack); and ``memory_ratio_vs_picows``. The issue's goal: 100,000 connections held on
one machine in at most 3 GiB.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any

from pydantic import Field

from iotpipe.bench.ingest import BENCH_SECRET, IngestBenchSettings, _Server
from iotpipe.bench.loadgen import LoadSpec, raise_nofile, run
from iotpipe.settings import TierSettings, parse_settings, tier_config

__all__ = ["main", "run_bench"]


class ConnectionsBenchSettings(TierSettings):
    """Hold many idle device connections on one ingest process; memory and one ack each."""

    model_config = tier_config("iotpipe bench connections", "IOTPIPE_BENCH_CONNECTIONS_",
                               {"json_output": "json"})

    connections: int = Field(100_000, ge=1, description="device connections to hold")
    hold: float = Field(10.0, ge=0, description="seconds to hold them idle")
    ping_interval: float = Field(5.0, gt=0, description="ingest's keepalive ping interval "
                                 "while holding (seconds)")
    baseline: bool = Field(True, description="also hold them on a bare picows front")
    connect_concurrency: int = Field(512, ge=1, description="handshakes in progress at once")
    json_output: bool = Field(False, description="print one JSON object")


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _hold(name: str, settings: ConnectionsBenchSettings, env: dict[str, str]
          ) -> dict[str, Any]:
    server = _Server(name, IngestBenchSettings(), env)
    server.ingest_args = ["--ping-interval", str(settings.ping_interval),
                          "--ping-timeout", str(settings.ping_interval)]
    server.start()
    try:
        assert server.proc is not None
        pid = server.proc.pid
        idle_rss = rss_bytes(pid)
        measured: dict[str, int] = {}

        def at_hold() -> None:
            measured["rss"] = rss_bytes(pid)

        spec = LoadSpec(url=f"ws://127.0.0.1:{server.port}/v1/ingest", secret=BENCH_SECRET,
                        connections=settings.connections, mode="idle", hold=settings.hold,
                        connect_concurrency=settings.connect_concurrency,
                        device_prefix=f"cb-{name}-")
        load = run(spec, on_hold=at_hold)
    finally:
        server.stop()
    held = int(load.get("held", 0))
    rss = measured.get("rss", 0)
    result: dict[str, Any] = {
        "held": held,
        "connect_failed": load.get("connect_failed", 0),
        "rss_bytes": rss,
        "idle_rss_bytes": idle_rss,
        "bytes_per_connection": round((rss - idle_rss) / held) if held else None,
        "connect_s": load.get("connect_s"),
        "acked": load.get("acked", 0),
        "ack_s": load.get("send_to_last_ack_s"),
        "errors": load.get("errors", 0),
    }
    result.update(server.extra)
    return result


def run_bench(settings: ConnectionsBenchSettings) -> dict[str, Any]:
    env = {**os.environ, "IOTPIPE_AUTH_SECRET": BENCH_SECRET}
    raise_nofile(settings.connections + 1024)
    results: dict[str, Any] = {}
    if settings.baseline:
        results["picows"] = _hold("picows", settings, env)
    results["ingest"] = _hold("ingest", settings, env)
    ingest = results["ingest"]
    base = results.get("picows", {}).get("bytes_per_connection")
    return {
        "bench": "connections",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg": os.getloadavg()[0]},
        "load": {"connections": settings.connections, "hold_s": settings.hold,
                 "ping_interval_s": settings.ping_interval},
        "results": results,
        "held": ingest["held"],
        "rss_bytes": ingest["rss_bytes"],
        "bytes_per_connection": ingest["bytes_per_connection"],
        "connect_s": ingest["connect_s"],
        "acked": ingest["acked"],
        "memory_ratio_vs_picows": (round(ingest["bytes_per_connection"] / base, 2)
                                   if base and ingest["bytes_per_connection"] else None),
    }


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(ConnectionsBenchSettings, argv)
    report = run_bench(settings)
    if settings.json_output:
        print(json.dumps(report))
    else:
        for name, r in report["results"].items():
            print(f"{name:>7}: held {r['held']} (failed {r['connect_failed']}) in "
                  f"{r['connect_s']} s, RSS {r['rss_bytes'] / 2**20:.0f} MiB, "
                  f"{r['bytes_per_connection']} B/connection, acked {r['acked']} in "
                  f"{r['ack_s']} s")
        print(f"  memory per connection vs bare picows: {report['memory_ratio_vs_picows']}")
    ok = all(r["held"] == settings.connections and r["acked"] == r["held"]
             for r in report["results"].values())
    return 0 if ok else 1
