"""Smoke test of ``iotpipe bench ingest --json``: it runs and reports the right shape
(speed is never asserted here; the benchmark itself measures it)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.timeout(180)]


def test_bench_ingest_json_shape() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "bench", "ingest", "--json",
         "--connections", "10", "--duration", "1"],
        capture_output=True, text=True, timeout=170,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["bench"] == "ingest"
    for name in ("bare", "ingest"):
        result = report["results"][name]
        assert result["ok"] is True
        assert result["acked"] > 0 and result["acks_per_s"] > 0
        assert set(result["ack_latency_ms"]) == {"p50", "p99"}
        assert result["server_cpu_s"] >= 0
    # The SIGTERM drain forwarded every acked message to the fake middle before exiting.
    assert report["results"]["ingest"]["drain_exit_code"] == 0
    assert report["results"]["ingest"]["middle_records"] >= report["results"]["ingest"]["acked"]
    assert report["ratio"] == pytest.approx(
        report["ingest_acks_per_s"] / report["bare_acks_per_s"], rel=0.01)
    assert report["load"]["connections"] == 10
