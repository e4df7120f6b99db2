"""``iotpipe bench connections``: how many idle devices one ingest process holds, and at what
memory cost, against a bare picows front holding the same number in the same run.

For each server (the bare picows front first, then the real ``iotpipe ingest`` with token
auth, its queue and an acking fake middle): open ``--connections`` device connections
(default 100,000) from 127.0.0.2, 127.0.0.3, ... (about 20k source ports each), with file
limits raised; hold them idle for ``--hold`` seconds while ingest's keepalive pings them
(``--ping-interval``); read the server's resident memory (all its processes); then send
one message on every connection and count the acks (ingest acks only what is durable).

Where the hard file limit cannot be raised (no CAP_SYS_RESOURCE: 20,000 on the development
machine), one process cannot hold 100,000 sockets: the load is spread over several
generator processes, and ingest runs ``--processes P`` on one port (SO_REUSEPORT), as a
pod does on a many-core node; the bare picows baseline runs P processes the same way.

Fields per server: ``held``, ``rss_bytes``, ``bytes_per_connection`` (RSS growth over the
server's idle RSS, divided by ``held``), ``connect_s``, ``acked``, ``ack_s`` (first send to
last ack), ``listen_overflows`` (the machine's TcpExtListenOverflows over that server's run:
SYNs dropped on a full accept queue, each costing a device a 1 s+ retransmit; other
processes' listeners count too); and ``memory_ratio_vs_picows``. The issue's goal: 100,000
connections held on one machine in at most 3 GiB.
"""

from __future__ import annotations

import json
import os
import platform
import select
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from itertools import pairwise
from pathlib import Path
from typing import Any

from pydantic import Field

from iotpipe.settings import TierSettings, parse_settings, tier_config
from iotpipe_tools.bench.ingest import BENCH_SECRET, IngestBenchSettings, _Server
from iotpipe_tools.bench.loadgen import LoadSpec
from iotpipe_tools.processes import tree_rss
from iotpipe_tools.sources import PORTS_PER_SOURCE, raise_nofile

__all__ = ["main", "run_bench"]

# Connections per process at most (beyond the file limit): keeps every process's share of
# a 2-core machine's CPU for keepalive and handshakes reasonable.
PER_PROCESS_MAX = 50_000


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
    timeout: float = Field(900.0, gt=0, description="seconds a load process may take to "
                                                    "connect, or to get its acks")
    json_output: bool = Field(False, description="print one JSON object")


def listen_overflows(netstat: Path = Path("/proc/net/netstat")) -> int | None:
    """The machine's count of connections dropped on a full accept queue (None: unknown)."""
    try:
        lines = netstat.read_text().splitlines()
    except OSError:
        return None
    for names, values in pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            counters = dict(zip(names.split(), values.split(), strict=True))
            value = counters.get("ListenOverflows")
            return int(value) if value is not None else None
    return None


def per_process(limit: int) -> int:
    """Connections one process may hold under file limit ``limit`` (headroom for the
    queue, ZeroMQ, pipes and /proc reads)."""
    return max(1000, min(PER_PROCESS_MAX, limit - 4096))


def _hold(name: str, settings: ConnectionsBenchSettings, env: dict[str, str],
          processes: int) -> dict[str, Any]:
    server = _Server(name, IngestBenchSettings(processes=processes), env)
    server.ingest_args = ["--ping-interval", str(settings.ping_interval),
                          "--ping-timeout", str(settings.ping_interval)]
    server.start()
    clients: list[subprocess.Popen[str]] = []
    overflows_before = listen_overflows()
    try:
        idle_rss = tree_rss(server.pids())
        limit = raise_nofile(2 * settings.connections + 4096)
        share = per_process(limit)
        counts = [min(share, settings.connections - start)
                  for start in range(0, settings.connections, share)]
        offset = 0
        for index, count in enumerate(counts):
            spec = LoadSpec(url=f"ws://127.0.0.1:{server.port}/v1/ingest",
                            secret=BENCH_SECRET, connections=count, mode="idle",
                            hold=settings.hold, handshake=True,
                            connect_concurrency=max(16, settings.connect_concurrency
                                                    // len(counts)),
                            device_prefix=f"cb-{name}-{index}-", source_offset=offset)
            offset += -(-count // PORTS_PER_SOURCE)
            clients.append(subprocess.Popen(
                [sys.executable, "-m", "iotpipe_tools.bench.loadgen", json.dumps(asdict(spec))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env))
        held_lines = [_read_line(c, settings.timeout) for c in clients]
        rss = tree_rss(server.pids())  # every client holds its connections now
        for client in clients:
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
        loads = [json.loads(_read_line(c, settings.timeout)) for c in clients]
        overflows_after = listen_overflows()
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
            client.wait(10)
        server.stop()
    held = sum(load.get("held", 0) for load in loads)
    result: dict[str, Any] = {
        "held": held,
        "held_before_messages": sum(int(line.split()[1]) for line in held_lines),
        "connect_failed": sum(load.get("connect_failed", 0) for load in loads),
        "rss_bytes": rss,
        "idle_rss_bytes": idle_rss,
        "bytes_per_connection": round((rss - idle_rss) / held) if held else None,
        "connect_s": max(load.get("connect_s", 0) for load in loads),
        "acked": sum(load.get("acked", 0) for load in loads),
        "ack_s": max(load.get("send_to_last_ack_s") or 0 for load in loads),
        "errors": sum(load.get("errors", 0) for load in loads),
        "listen_overflows": (overflows_after - overflows_before
                             if overflows_before is not None and overflows_after is not None
                             else None),
        "server_processes": processes,
        "client_processes": len(clients),
    }
    result.update(server.extra)
    return result


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line from a client's stdout within ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"load generator process {proc.pid} said nothing within "
                           f"{timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"load generator process {proc.pid} ended without a report "
                           f"(exit status {proc.wait(10)}; its error is above)")
    return line


def run_bench(settings: ConnectionsBenchSettings) -> dict[str, Any]:
    env = {**os.environ, "IOTPIPE_AUTH_SECRET": BENCH_SECRET}
    limit = raise_nofile(2 * settings.connections + 4096)
    # One process holds what its file limit allows: where the hard limit cannot be raised
    # (no CAP_SYS_RESOURCE, e.g. 20,000 here), ingest runs several processes on one port.
    processes = max(1, -(-settings.connections // per_process(limit)))
    results: dict[str, Any] = {}
    if settings.baseline:
        results["picows"] = _hold("picows", settings, env, processes)
    results["ingest"] = _hold("ingest", settings, env, processes)
    ingest = results["ingest"]
    base = results.get("picows", {}).get("bytes_per_connection")
    return {
        "bench": "connections",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_avg": os.getloadavg()[0]},
        "load": {"connections": settings.connections, "hold_s": settings.hold,
                 "ping_interval_s": settings.ping_interval, "nofile_limit": limit,
                 "processes": processes},
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
        print(f"  memory per connection vs bare picows: {report['memory_ratio_vs_picows']}"
              f" ({report['load']['processes']} server processes each)")
    ok = all(r["held"] == settings.connections and r["acked"] == r["held"]
             for r in report["results"].values())
    return 0 if ok else 1
