"""Helpers shared by the storage tests: feed records, a fake middle feed, a storage process."""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from iotpipe import wire
from support.ports import free_port
from support.processes import ProcessGroup
from support.waiting import exited, wait_for, wait_ready

T0_NS = 1_764_151_200_000_000_000  # 2025-11-26T10:00:00Z


def log_record(device_id: str, msg_id: str, ts_ns: int, data: bytes = b'{"t":1}',
               node: str = "ingest-0-p0", node_seq: int = 1) -> bytes:
    reading = wire.encode_reading(device_id, msg_id, ts_ns, data, ts_ns + 1000)
    return wire.encode_log_record(node, node_seq, reading)


def make_log(n: int, devices: int = 5, prefix: str = "dev-") -> list[bytes]:
    """``n`` log records (seq 1..n), device ``<prefix><i % devices>``, ts one second apart."""
    return [
        log_record(f"{prefix}{i % devices}", f"m-{i}", T0_NS + i * 1_000_000_000,
                   b'{"i":%d}' % i, node_seq=i)
        for i in range(1, n + 1)
    ]


class FakeFeed:
    """A minimal middle feed (ROUTER) honouring credit, acks and redelivery on restart.

    It keeps the acknowledged seqs; a fresh instance given them (a "restarted middle")
    starts delivering at the lowest unacknowledged seq, or at ``start_at`` if lower.
    Deliveries hold at most ``batch`` records and never exceed the consumer's credit.
    """

    def __init__(self, endpoint: str, log: list[bytes], middle_id: str = "middle-0",
                 group: str = "storage", batch: int = 50,
                 acked: set[int] | None = None, start_at: int | None = None) -> None:
        self.endpoint = endpoint
        self.log = log
        self.middle_id = middle_id
        self.group = group
        self.batch = batch
        self.acked: set[int] = acked if acked is not None else set()
        # Where delivery starts: the lowest unacked record, or earlier (a middle whose ack
        # checkpoint lagged redelivers records the consumer already stored).
        self.start_at = start_at if start_at is not None else 1 << 62
        self.requests: list[wire.FeedRequest] = []
        self.malformed_first = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._ready = threading.Event()
        self.on_request: Callable[[wire.FeedRequest], None] | None = None

    def start(self) -> FakeFeed:
        self._thread.start()
        assert self._ready.wait(5), "fake feed did not start"
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def acked_count(self) -> int:
        with self._lock:
            return len(self.acked)

    def _serve(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._ready.set()
        credit: dict[bytes, int] = {}
        outstanding: dict[bytes, set[int]] = {}  # delivered, not yet acked, per consumer
        with self._lock:
            next_seq = max(1, min(self.start_at, self._lowest_unacked()))
        try:
            while not self._stop.is_set():
                if sock.poll(20):
                    identity, *frames = sock.recv_multipart()
                    request = wire.decode_feed_request(frames)
                    self.requests.append(request)
                    held = outstanding.setdefault(identity, set())
                    with self._lock:
                        for first, last in request.acks:
                            self.acked.update(range(first, last + 1))
                            held.difference_update(range(first, last + 1))
                    # Credit is a window of unacknowledged records (see the consumer docs).
                    credit[identity] = request.credit
                    if self.malformed_first:
                        self.malformed_first = False
                        sock.send_multipart([identity, wire.KIND_RECORDS, b"\xc1"])
                for identity, window in credit.items():
                    held = outstanding[identity]
                    while window - len(held) > 0 and next_seq <= len(self.log):
                        n = min(window - len(held), self.batch,
                                len(self.log) - next_seq + 1)
                        records = self.log[next_seq - 1: next_seq - 1 + n]
                        sock.send_multipart([identity, *wire.encode_records(
                            self.group, self.middle_id, next_seq, records)])
                        held.update(range(next_seq, next_seq + n))
                        next_seq += n
        finally:
            sock.close(0)
            ctx.term()

    def _lowest_unacked(self) -> int:
        seq = 1
        while seq in self.acked:
            seq += 1
        return seq


def header(frames: list[bytes]) -> dict[str, object]:
    return dict(msgpack.unpackb(frames[1]))


AKUMULID_CONFIG = """path={root}/db
nvolumes=2
volume_size=64MB

[HTTP]
port={http_port}
bind_addr=127.0.0.1

[TCP]
port={tcp_port}
bind_addr=127.0.0.1
pool_size=1

[WAL]
path={root}/wal
volume_size=16MB
nvolumes=2

log4j.rootLogger=info, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=%d [%t] %c [%p] %m%n
log4j.appender.file.filename={root}/akumuli.log
"""


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_real_akumulid(procs: Any, root: Path, tcp_port: int, http_port: int
                        ) -> bool:
    """Create a database under ``root`` and start ``akumulid`` on loopback (the recipe of
    /work/shared/AKUMULI.md); False when no ``akumulid`` is on PATH."""
    binary = shutil.which("akumulid")
    if binary is None:
        return False
    (root / "db").mkdir(parents=True)
    (root / "wal").mkdir()
    config = root / "akumulid.conf"
    config.write_text(AKUMULID_CONFIG.format(root=root, http_port=http_port,
                                             tcp_port=tcp_port))
    subprocess.run([binary, "--create", "--config", str(config)], check=True, timeout=120,
                   capture_output=True)
    procs.start([binary, "--config", str(config)], name="akumulid")
    # Listening is not answering: wait until a query gets a 200 (a new database answers
    # "-not found"), the first thing every test then does.
    wait_for(lambda: _port_open(tcp_port) and _akumuli_answers(http_port), 30,
             "akumulid to answer queries", interval=0.1, details=lambda: procs.log("akumulid"))
    return True


def _akumuli_answers(http_port: int) -> bool:
    query = b'{"select": "readiness_probe", "range": {"from": "20000101T000000", ' \
            b'"to": "20000101T000001"}, "output": {"format": "csv"}}'
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/api/query", data=query,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:  # refused, reset, or an HTTP error status
        return False


STORAGE_REGISTRY_YAML = """
devices:
  a-dev-1: {class: boiler, location: hall-2, labels: {line: 3}}
prefixes:
  a-: {class: sensor, location: plant-a}
"""


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def metric(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{" if labels or "{" in line.split(" ")[0] else name + " ") \
                and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def start_storage(procs: ProcessGroup, tmp_path: Path, endpoints: list[str], name: str,
                  window: int = 500, sinks: list[str] | None = None
                  ) -> tuple[subprocess.Popen[bytes], int]:
    registry = tmp_path / "registry.yaml"
    if not registry.exists():
        registry.write_text(STORAGE_REGISTRY_YAML)
    metrics_port = free_port()
    proc = procs.iotpipe(
        "storage", "--host", "127.0.0.1", "--metrics-port", str(metrics_port),
        "--feed-endpoints", ",".join(endpoints), "--consumer-id", "storage-test",
        "--sinks", ",".join(sinks or [f"sqlite://{tmp_path}/store/readings.db"]),
        "--registry-file", str(registry), "--window", str(window),
        "--heartbeat", "0.2", name=name)
    wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", 15, what="storage ready",
               abort=exited(proc, name), details=lambda: procs.log(name))
    return proc, metrics_port


def db_rows(tmp_path: Path) -> list[tuple[object, ...]]:
    db = sqlite3.connect(tmp_path / "store" / "readings.db")
    try:
        return db.execute("SELECT device_id, msg_id, node_seq, data, device_class, location,"
                          " labels FROM readings").fetchall()
    finally:
        db.close()


def start_victoria_metrics(procs: ProcessGroup, data_dir: Path, *flags: str) -> int:
    """Debian's victoria-metrics on a free loopback port, once /health answers (the port).
    Never run with -dedup: the sink's own read-back keeps redeliveries out. Skips the
    calling test when the binary is not installed."""
    binary = shutil.which("victoria-metrics")
    if binary is None:
        pytest.skip("victoria-metrics is not installed (Debian package victoria-metrics)")
    port = free_port()
    procs.start([binary, f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={data_dir}",
                 "-retentionPeriod=100y", "-loggerLevel=ERROR", *flags], name="victoria")

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    wait_for(healthy, 20, "victoria-metrics up", details=lambda: procs.log("victoria"))
    return port
