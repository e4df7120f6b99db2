"""`iotpipe bench relay` runs end to end and prints the documented JSON shape (not speed)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

pytestmark = [pytest.mark.bench, pytest.mark.timeout(120)]


def test_bench_relay_json_shape() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "bench", "relay", "--events", "300",
         "--clients", "2", "--json"],
        capture_output=True, timeout=110, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = orjson.loads(result.stdout)
    assert report["bench"] == "relay" and report["events"] == 300 and report["clients"] == 2
    assert set(report["machine"]) >= {"cpus", "python", "loadavg_1m"}
    servers = [row["server"] for row in report["results"]]
    assert servers == ["bare", "relay"]
    for row in report["results"]:
        assert row["events_per_s"] > 0 and row["frames_per_s"] == pytest.approx(
            2 * row["events_per_s"], rel=0.01, abs=2)
        assert row["missed"] == 0  # queues are sized so that nothing is dropped
    assert report["results"][1]["ratio"] > 0
