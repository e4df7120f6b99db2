"""``iotpipe bench storage``: how fast the storage tier stores readings.

Two measurements, each next to the plainest way to do the same work in the same run:

``sink``: ``SqliteSink.write`` of enriched readings, one transaction per call, for several
batch sizes, against plain ``sqlite3`` ``executemany`` of the same pre-built rows into the
same table with the same pragmas (WAL, synchronous=FULL, 64 MiB cache). ``ratio`` = sink / plain.

``end_to_end``: a real ``iotpipe storage`` process consuming ``--records`` readings from a
feed served by this driver (a ROUTER honouring the credit window, deliveries of
``--delivery`` records), from the first delivery to the last acknowledgement, compared with
the sink alone at the delivery size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import zmq

from iotpipe import wire
from iotpipe.registry import Registry
from iotpipe.storage.enrich import StoredReading, enrich_records
from iotpipe.storage.sinks import SinkBatch
from iotpipe.storage.sinks.sqlite import _INSERT, _SCHEMA, SqliteSink
from iotpipe_tools.ports import free_port

__all__ = ["main"]

_T0_NS = 1_764_151_200_000_000_000
_REGISTRY = Registry.from_yaml(
    "prefixes: {dev-: {class: thermometer, location: plant-a, labels: {line: '3'}}}")


def _records(n: int) -> list[bytes]:
    return [
        wire.encode_log_record("bench-p0", i, wire.encode_reading(
            f"dev-{i % 1000}", f"m-{i}", _T0_NS + i, b'{"t":21.5,"h":40}', _T0_NS + i))
        for i in range(1, n + 1)
    ]


def _bench_sink(readings: list[StoredReading], batch: int, workdir: Path) -> dict[str, float]:
    sink = SqliteSink(workdir / f"sink-{batch}.db")
    started = time.perf_counter()
    for i in range(0, len(readings), batch):
        sink.write([SinkBatch("m", i + 1, readings[i: i + batch])])
    sink_s = time.perf_counter() - started
    sink.close()

    rows = [(r.device_id, r.msg_id, r.ts_ns, r.received_ns, r.node, r.node_seq, r.data,
             r.device_class, r.location, '{"line":"3"}') for r in readings]
    db = sqlite3.connect(workdir / f"plain-{batch}.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA cache_size=-65536")
    db.executescript(_SCHEMA)
    started = time.perf_counter()
    for i in range(0, len(rows), batch):
        db.execute("BEGIN")
        db.executemany(_INSERT, rows[i: i + batch])
        db.execute("COMMIT")
    plain_s = time.perf_counter() - started
    db.close()
    return {"batch": batch, "records_per_s": round(len(readings) / sink_s),
            "plain_records_per_s": round(len(rows) / plain_s),
            "ratio": round(plain_s / sink_s, 3)}


def _bench_end_to_end(records: list[bytes], delivery: int, window: int, workdir: Path
                      ) -> dict[str, float]:
    feed_port, metrics_port = free_port(), free_port()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(f"tcp://127.0.0.1:{feed_port}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "iotpipe.cli", "storage", "--host", "127.0.0.1",
         "--metrics-port", str(metrics_port), "--feed-endpoints",
         f"tcp://127.0.0.1:{feed_port}", "--sinks", f"sqlite://{workdir}/e2e.db",
         "--registry-file", str(workdir / "none.yaml"), "--window", str(window),
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        next_seq, acked, outstanding, credit = 1, 0, 0, 0
        peer: bytes | None = None
        started: float | None = None
        deadline = time.monotonic() + 300
        while acked < len(records):
            if time.monotonic() > deadline:
                raise RuntimeError("end-to-end run did not finish within 300 s")
            if router.poll(100):
                peer, *frames = router.recv_multipart()
                request = wire.decode_feed_request(frames)
                done = sum(last - first + 1 for first, last in request.acks)
                acked += done
                outstanding -= done
                credit = request.credit
            while peer is not None and next_seq <= len(records) and outstanding < credit:
                n = min(delivery, credit - outstanding, len(records) - next_seq + 1)
                if started is None:
                    started = time.perf_counter()
                router.send_multipart([peer, *wire.encode_records(
                    "storage", "bench-middle", next_seq, records[next_seq - 1: next_seq - 1 + n])])
                next_seq += n
                outstanding += n
        assert started is not None
        elapsed = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        router.close()
        ctx.term()
    return {"records": len(records), "delivery": delivery, "window": window,
            "records_per_s": round(len(records) / elapsed), "seconds": round(elapsed, 3)}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="iotpipe bench storage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="readings per run")
    parser.add_argument("--delivery", type=int, default=512, help="records per feed delivery")
    parser.add_argument("--window", type=int, default=2000, help="storage feed window")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(list(argv))
    if args.records < 1 or args.delivery < 1 or args.window < 1:
        parser.error("--records, --delivery and --window must be >= 1")

    records = _records(args.records)
    readings, _ = enrich_records(1, records, _REGISTRY)
    with tempfile.TemporaryDirectory(prefix="iotpipe-bench-storage-") as tmp:
        workdir = Path(tmp)
        # Batch 1 costs one fsync per row: it runs on a bounded sample.
        sink_results = [_bench_sink(readings[:5000] if batch == 1 else readings, batch, workdir)
                        for batch in sorted({1, 64, args.delivery, 2048})]
        end_to_end = _bench_end_to_end(records, args.delivery, args.window, workdir)
    result = {
        "bench": "storage",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version},
        "sink": sink_results,
        "end_to_end": end_to_end,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'sqlite sink batch':>18} {'records/s':>10} {'plain/s':>10} {'ratio':>6}")
    for row in sink_results:
        print(f"{row['batch']:>18} {row['records_per_s']:>10} {row['plain_records_per_s']:>10}"
              f" {row['ratio']:>6}")
    print(f"end to end (iotpipe storage, delivery {args.delivery}, window {args.window}): "
          f"{end_to_end['records_per_s']} records/s")
    return 0
