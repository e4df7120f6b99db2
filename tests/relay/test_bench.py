"""`iotpipe bench relay` runs end to end and prints the documented JSON shape (not speed)."""

from __future__ import annotations

import sys

import orjson
import pytest
from support.processes import run_bounded

pytestmark = [pytest.mark.bench, pytest.mark.timeout(120)]


@pytest.mark.parametrize("live_format", ["v2", "v1"])
def test_bench_relay_json_shape(live_format: str) -> None:
    # v2 (the default): 300 events in messages of 64, the last one partial
    result = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "relay", "--events", "300",
         "--clients", "2", "--live-format", live_format, "--json"],
        capture_output=True, timeout=110, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = orjson.loads(result.stdout)
    assert (report["live_format"], report["group"]) == (live_format,
                                                        64 if live_format == "v2" else 1)
    assert report["bench"] == "relay" and report["events"] == 300 and report["clients"] == 2
    assert set(report["machine"]) >= {"cpus", "python", "loadavg_1m"}
    servers = [row["server"] for row in report["results"]]
    assert servers == ["bare", "bare_picows", "relay"]
    for row in report["results"]:
        assert row["events_per_s"] > 0 and row["frames_per_s"] == pytest.approx(
            2 * row["events_per_s"], rel=0.01, abs=2)
        assert row["frames"] == 600  # every client got every event
        assert row["missed"] == 0  # queues are sized so that nothing is dropped
        assert row["server_cpu_s"] >= 0
    relay = report["results"][2]
    assert relay["ratio"] > 0 and "cpu_ratio" in relay and "cpu_ratio_vs_picows" in relay


def test_bench_relay_device_shape_delivers_each_client_its_own_device() -> None:
    # 200 events over 100 devices: client i follows dev-i, so each client gets 2 of them.
    result = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "relay", "--events", "200",
         "--clients", "3", "--shape", "device", "--json"],
        capture_output=True, timeout=110, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = orjson.loads(result.stdout)
    assert report["shape"] == "device"
    assert [row["frames"] for row in report["results"]] == [6, 6, 6]
