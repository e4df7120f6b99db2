"""A real ``iotpipe storage`` process against fake middle feeds, and ``iotpipe query``."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from support.ports import free_port
from support.processes import ProcessGroup
from support.storage import T0_NS, FakeFeed, db_rows, http_get, make_log, metric, start_storage
from support.waiting import wait_for

from iotpipe import wire

pytestmark = pytest.mark.integration

def run_query(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "iotpipe.cli", "query", *args],
                          capture_output=True, text=True, timeout=30)


def test_every_record_from_every_middle_stored_once_enriched_then_queried(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    feeds = [
        FakeFeed(f"tcp://127.0.0.1:{free_port()}", make_log(600, prefix="a-dev-"),
                 middle_id="middle-0").start(),
        FakeFeed(f"tcp://127.0.0.1:{free_port()}", make_log(400, prefix="b-dev-"),
                 middle_id="middle-1").start(),
    ]
    feeds[0].malformed_first = True  # one garbage message must not stop the feed
    try:
        proc, metrics_port = start_storage(procs, tmp_path, [f.endpoint for f in feeds],
                                           "storage")
        wait_for(lambda: feeds[0].acked_count() == 600 and feeds[1].acked_count() == 400,
                 20, "every record acknowledged")
        rows = db_rows(tmp_path)
        assert len(rows) == 1000
        assert len({(r[0], r[1]) for r in rows}) == 1000
        by_key = {(r[0], r[1]): r for r in rows}
        assert by_key[("a-dev-1", "m-6")][2:] == (6, '{"i":6}', "boiler", "hall-2",
                                                   '{"line":"3"}')
        assert by_key[("a-dev-2", "m-7")][4:6] == ("sensor", "plant-a")
        assert by_key[("b-dev-2", "m-7")][4:] == ("unknown", "unknown", "{}")
        # Every request restated the group and this consumer's id; credit = the window.
        assert all(r.group == "storage" and r.consumer == "storage-test" and r.credit == 500
                   for f in feeds for r in f.requests)

        status, text = http_get(metrics_port, "/metrics")
        assert status == 200
        assert metric(text, "iotpipe_storage_records_written_total", 'sink="sqlite"') == 1000
        assert metric(text, "iotpipe_storage_malformed_messages_total") == 1
        assert metric(text, "iotpipe_storage_write_seconds_count", 'sink="sqlite"') >= 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, procs.log("storage")
        # After SIGTERM the last request carried credit 0.
        assert feeds[0].requests[-1].credit == 0
    finally:
        for feed in feeds:
            feed.stop()

    # iotpipe query: by device and time range, JSON lines.
    db = str(tmp_path / "store" / "readings.db")
    since = str((T0_NS + 6_000_000_000) / 1e9)
    result = run_query("--db", db, "--device", "a-dev-1", "--since", since,
                       "--until", "2025-11-26T10:00:21Z", "--json")
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [line["msg_id"] for line in lines] == ["m-6", "m-11", "m-16"]
    assert lines[0] == {
        "device_id": "a-dev-1", "msg_id": "m-6", "ts": "2025-11-26T10:00:06.000000000Z",
        "ts_ns": T0_NS + 6_000_000_000, "data": {"i": 6}, "class": "boiler",
        "location": "hall-2", "labels": {"line": "3"}, "node": "ingest-0-p0", "node_seq": 6,
    }
    result = run_query("--sink", f"sqlite://{db}", "--count")
    assert (result.returncode, result.stdout.strip()) == (0, "1000")
    result = run_query("--db", db, "--device", "b-dev-3", "--count")
    assert result.stdout.strip() == "80"
    result = run_query("--db", db, "--device", "b-dev-3", "--limit", "2")
    assert result.returncode == 0
    table = result.stdout.splitlines()
    assert table[0].split() == ["ts", "device_id", "msg_id", "class", "location", "data"]
    assert len(table) == 3 and "b-dev-3" in table[1]
    result = run_query("--db", db, "--since", "last tuesday")
    assert result.returncode == 2 and "last tuesday" in result.stderr


def test_sigkill_mid_stream_then_restart_stores_everything_exactly_once(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    total = 12_000
    log = make_log(total, devices=50, prefix="a-dev-")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    acked: set[int] = set()
    msg_of_seq = {seq: wire.decode_reading(wire.decode_log_record(raw).reading).msg_id
                  for seq, raw in enumerate(log, start=1)}
    rng = random.Random(7)
    for round_no in range(3):
        # Each round: a (restarted) middle redelivers from 100 records below its lowest
        # unacknowledged one, so records stored before the kill come again.
        lowest = next(seq for seq in range(1, total + 2) if seq not in acked)
        feed = FakeFeed(endpoint, log, batch=20, acked=acked, start_at=lowest - 100).start()
        try:
            proc, metrics_port = start_storage(procs, tmp_path, [endpoint],
                                               f"storage-{round_no}", window=40)
            if round_no < 2:
                target = len(acked) + rng.randint(1000, 3000)
                wait_for(lambda f=feed, t=target: f.acked_count() >= t, 20, "progress")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                assert len(acked) < total, "the kill came after the stream ended"
            else:
                wait_for(lambda f=feed: f.acked_count() == total, 30, "every record acked")
                _, text = http_get(metrics_port, "/metrics")
                # The 100 redelivered records were stored before: duplicates, not new rows.
                assert metric(text, "iotpipe_storage_duplicates_total", 'sink="sqlite"') >= 100
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(timeout=10) == 0
        finally:
            feed.stop()
        # Ack means durable: every acknowledged record is in the store after the kill.
        stored = {r[1] for r in db_rows(tmp_path)}
        missing = [seq for seq in acked if msg_of_seq[seq] not in stored]
        assert missing == [], f"acknowledged but not stored: {missing[:10]}"
    assert len(acked) == total
    rows = db_rows(tmp_path)
    assert len(rows) == total
    assert {r[1] for r in rows} == set(msg_of_seq.values())


def test_bad_settings_fail_at_startup_naming_the_problem(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    base = [sys.executable, "-m", "iotpipe.cli", "storage", "--host", "127.0.0.1",
            "--metrics-port", str(free_port()), "--registry-file", str(tmp_path / "r.yaml")]
    result = subprocess.run([*base, "--feed-endpoints", "tcp://127.0.0.1:1",
                             "--sinks", "mongodb://db:27017"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "'mongodb://db:27017'" in result.stderr and "unknown scheme" in result.stderr
    result = subprocess.run([*base, "--sinks", f"sqlite://{tmp_path}/x.db"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--feed-endpoints" in result.stderr
    result = subprocess.run([*base, "--feed-endpoints", "nonsense",
                             "--sinks", f"sqlite://{tmp_path}/x.db"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "'nonsense'" in result.stderr
