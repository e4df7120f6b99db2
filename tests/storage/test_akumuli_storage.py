"""A real ``iotpipe storage`` process writing to the Akumuli stand-in: an ``akumuli://`` sink
URL is accepted at start, and SIGKILL plus redelivery stores every point exactly once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.akumuli_standin import AkumuliStandin
from support.ports import free_port
from support.processes import ProcessGroup
from support.storage import T0_NS, FakeFeed, make_log
from support.waiting import wait_for

pytestmark = pytest.mark.integration

S = 1_000_000_000


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def standin() -> Iterator[AkumuliStandin]:
    with AkumuliStandin() as server:
        yield server


def _start(procs: ProcessGroup, tmp_path: Path, endpoint: str, akumuli_url: str, name: str
           ) -> subprocess.Popen[bytes]:
    metrics_port = free_port()
    proc = procs.iotpipe(
        "storage", "--host", "127.0.0.1", "--metrics-port", str(metrics_port),
        "--feed-endpoints", endpoint, "--consumer-id", "akumuli-test", "--window", "40",
        "--sinks", f"sqlite://{tmp_path}/store/readings.db,{akumuli_url}",
        "--registry-file", str(tmp_path / "none.yaml"), "--heartbeat", "0.2",
        "--data-dir", str(tmp_path / "store"), name=name)  # the marks file goes there
    wait_for(lambda: proc.poll() is not None or _ready(metrics_port), 15, "storage ready")
    assert proc.poll() is None, procs.log(name)
    return proc


def test_sigkill_and_redelivery_store_every_point_once(
        procs: ProcessGroup, tmp_path: Path, standin: AkumuliStandin) -> None:
    total = 3000
    full_log = make_log(total, devices=20, prefix="a-dev-")  # data {"i": n}, ts T0 + n s
    # Devices send over time (the feed serves what the log holds so far), so that the
    # kills land mid-stream however fast the storage tier is.
    log: list[bytes] = []
    done_sending = threading.Event()

    def fleet() -> None:
        while len(log) < total and not done_sending.wait(0.05):
            log.extend(full_log[len(log):len(log) + 30])  # about 600 records/s

    pacer = threading.Thread(target=fleet, daemon=True)
    pacer.start()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    url = f"akumuli://{standin.host}:{standin.port}?query_port={standin.query_port}"
    acked: set[int] = set()
    rng = random.Random(11)
    for round_no in range(3):
        lowest = next(seq for seq in range(1, total + 2) if seq not in acked)
        # a restarted middle redelivers from 60 records below the lowest unacknowledged one
        feed = FakeFeed(endpoint, log, batch=20, acked=acked, start_at=lowest - 60).start()
        try:
            proc = _start(procs, tmp_path, endpoint, url, f"storage-{round_no}")
            if round_no < 2:
                target = len(acked) + rng.randint(300, 900)
                wait_for(lambda f=feed, t=target: f.acked_count() >= t, 20, "progress")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                assert len(acked) < total, "the kill came after the stream ended"
            else:
                wait_for(lambda: len(log) == total, 30, "the devices to finish sending")
                wait_for(lambda f=feed: f.acked_count() == total, 30, "every record acked")
                # Akumuli tails the store of record: it catches up after the acks.
                wait_for(lambda: sum(len(p) for p in standin.series().values()) == total, 30,
                          "Akumuli caught up")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=10) == 0, procs.log(f"storage-{round_no}")
        finally:
            feed.stop()
    done_sending.set()
    pacer.join(5)
    assert (tmp_path / "store" / f"akumuli-127.0.0.1-{standin.port}.marks.db").exists()
    stored = standin.series()
    expected = {}
    for n in range(1, total + 1):
        series = f"i class=unknown device=a-dev-{n % 20} location=unknown"
        expected.setdefault(series, []).append((T0_NS + n * S, float(n)))
    assert stored == expected  # every point, in order, none twice
