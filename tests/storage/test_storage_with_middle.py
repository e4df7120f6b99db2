"""Storage against a real ``iotpipe middle``: SIGKILL either side, nothing lost or doubled."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import zmq
from support.ports import free_port
from support.processes import ProcessGroup
from support.storage import http_get, metric, start_storage
from support.waiting import wait_for

from iotpipe import wire

pytestmark = [pytest.mark.integration, pytest.mark.crash]

T0_NS = 1_764_151_200_000_000_000


class RealMiddle:
    def __init__(self, procs: ProcessGroup, data_dir: Path) -> None:
        self.procs = procs
        self.data_dir = data_dir
        self.router_port = free_port()
        self.feed_port = free_port()
        self.metrics_port = free_port()
        self.pub_port = free_port()
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.starts += 1
        name = f"middle-{self.starts}"
        self.proc = self.procs.iotpipe(
            "middle", "--host", "127.0.0.1", "--router-port", str(self.router_port),
            "--pub-port", str(self.pub_port), "--feed-port", str(self.feed_port),
            "--metrics-port", str(self.metrics_port), "--data-dir", str(self.data_dir),
            "--middle-id", "mid-0", "--checkpoint-interval", "0.1",
            "--consumer-groups", "storage", name=name)
        proc = self.proc
        wait_for(lambda: proc.poll() is not None
                 or http_get(self.metrics_port, "/readyz")[0] == 200, 20, "middle ready")
        assert proc.poll() is None, self.procs.log(name)

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def lag(self) -> float:
        status, text = http_get(self.metrics_port, "/metrics")
        return metric(text, "iotpipe_middle_feed_lag_records", 'group="storage"') \
            if status == 200 else -1.0


def send_batches(middle: RealMiddle, node: str, first: int, last: int, per_batch: int) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{middle.router_port}")
    try:
        for start in range(first, last + 1, per_batch):
            readings = [
                wire.encode_reading(f"a-dev-{seq % 7}", f"{node}-{seq}",
                                    T0_NS + seq * 1_000_000, b'{"v":%d}' % seq, T0_NS)
                for seq in range(start, min(last, start + per_batch - 1) + 1)
            ]
            sock.send_multipart(wire.encode_batch(node, start, readings))
            assert sock.poll(10_000), "middle did not answer a batch"
            reply = sock.recv_multipart()
            assert wire.message_kind(reply) == wire.KIND_ACK, reply
    finally:
        sock.close()


def stored(db_path: Path) -> list[tuple[str, str]]:
    if not db_path.exists():
        return []
    db = sqlite3.connect(db_path, timeout=10)
    try:
        return db.execute("SELECT device_id, msg_id FROM readings").fetchall()
    finally:
        db.close()


def test_storage_and_middle_killed_and_restarted_store_everything_once(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    middle = RealMiddle(procs, tmp_path / "middle")
    middle.start()
    db_path = tmp_path / "store" / "readings.db"
    endpoint = f"tcp://127.0.0.1:{middle.feed_port}"
    send_batches(middle, "ing-0-p0", 1, 4000, 100)

    # A small window keeps the first storage busy long enough to be killed mid-stream.
    storage, _ = start_storage(procs, tmp_path, [endpoint], "storage-1", window=5)
    wait_for(lambda: len(stored(db_path)) >= 1000, 20, "storage progress")
    os.killpg(storage.pid, signal.SIGKILL)
    storage.wait(timeout=10)
    middle.kill()
    assert len(stored(db_path)) < 4000, "the kill came after the stream ended"

    middle.start()
    send_batches(middle, "ing-1-p0", 1, 2000, 50)
    send_batches(middle, "ing-0-p0", 3901, 4000, 100)  # a resent batch: middle dedups
    storage, metrics_port = start_storage(procs, tmp_path, [endpoint], "storage-2", window=200)
    wait_for(lambda: len(stored(db_path)) >= 6000 and middle.lag() == 0, 30,
             "every record stored and acknowledged")

    # The middle alone dies and comes back: the running storage resumes through heartbeats.
    middle.kill()
    middle.start()
    send_batches(middle, "ing-2-p0", 1, 1000, 100)
    wait_for(lambda: len(stored(db_path)) >= 7000 and middle.lag() == 0, 30,
             "records sent after the middle restart stored and acknowledged")
    _, text = http_get(metrics_port, "/metrics")
    storage.send_signal(signal.SIGTERM)
    assert storage.wait(timeout=10) == 0, procs.log("storage-2")

    rows = stored(db_path)
    assert len(rows) == 7000
    expected = {(f"a-dev-{s % 7}", f"ing-0-p0-{s}") for s in range(1, 4001)}
    expected |= {(f"a-dev-{s % 7}", f"ing-1-p0-{s}") for s in range(1, 2001)}
    expected |= {(f"a-dev-{s % 7}", f"ing-2-p0-{s}") for s in range(1, 1001)}
    assert set(rows) == expected
    assert metric(text, "iotpipe_storage_records_written_total", 'sink="sqlite"') > 0


def test_storage_consumes_every_configured_middle(procs: ProcessGroup, tmp_path: Path) -> None:
    middles = [RealMiddle(procs, tmp_path / f"middle-{i}") for i in range(2)]
    for middle in middles:
        middle.start()
    send_batches(middles[0], "ing-0-p0", 1, 500, 100)
    send_batches(middles[1], "ing-1-p0", 1, 700, 100)
    db_path = tmp_path / "store" / "readings.db"
    storage, _ = start_storage(
        procs, tmp_path, [f"tcp://127.0.0.1:{m.feed_port}" for m in middles], "storage")
    wait_for(lambda: len(stored(db_path)) >= 1200 and all(m.lag() == 0 for m in middles), 30,
             "records of both middles stored and acknowledged")
    storage.send_signal(signal.SIGTERM)
    assert storage.wait(timeout=10) == 0
    rows = stored(db_path)
    assert len(rows) == 1200
    assert {msg.rsplit("-", 1)[0] for _, msg in rows} == {"ing-0-p0", "ing-1-p0"}
