"""``iotpipe bench NAME``: benchmarks that report absolute numbers next to same-run baselines.

Speed is never asserted by tests; these commands measure it. Each benchmark compares
against the plainest way to do the same work, measured in the same run, because the
machines this runs on are shared and noisy.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

BENCHMARKS: dict[str, tuple[str, str]] = {
    "queue": ("iotpipe_tools.bench.queue:main",
              "persistent queue append throughput vs pwrite+fdatasync"),
    "ingest": ("iotpipe_tools.bench.ingest:main",
               "ingest durable acks per CPU-second vs bare picows and websockets fronts"),
    "connections": ("iotpipe_tools.bench.connections:main",
                    "idle device connections held by ingest: memory, then one ack each"),
    "pipeline": ("iotpipe_tools.bench.pipeline:main",
                 "devices to a live client and to storage through all four tiers"),
    "storage": ("iotpipe_tools.bench.storage:main", "storage records/s vs plain SQLite inserts"),
    "middle": ("iotpipe_tools.bench.middle:main", "middle ROUTER records/s vs a bare ROUTER"),
    "relay": ("iotpipe_tools.bench.relay:main",
              "relay events/s to WebSocket clients vs a bare fan-out"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: iotpipe bench NAME [options]\n")
        for name, (_, text) in BENCHMARKS.items():
            print(f"  {name:8}  {text}")
        return 0
    if args[0] not in BENCHMARKS:
        print(f"iotpipe bench: unknown benchmark {args[0]!r}", file=sys.stderr)
        return 2
    module_name, func_name = BENCHMARKS[args[0]][0].split(":")
    return int(getattr(importlib.import_module(module_name), func_name)(args[1:]) or 0)
