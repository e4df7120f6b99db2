"""Smoke test of ``iotpipe bench pipeline --json`` with small numbers: readings sent by the
load generator reach the live client and the store of record through all four tiers, and
the report has its fields (latencies are reported, never asserted)."""

from __future__ import annotations

import json
import sys

import pytest
from support.processes import run_bounded

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]


def test_bench_pipeline_json_shape() -> None:
    done = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "pipeline", "--json",
         "--rate", "500", "--connections", "20", "--duration", "2", "--warmup", "1",
         "--settle", "20"],
        capture_output=True, text=True, timeout=290,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["bench"] == "pipeline"
    sent = report["sent_in_window"]
    assert sent > 0 and report["acked_in_window"] > 0
    # Everything sent in the window reached the client and the store (settle waited).
    assert report["relay_readings_in_window"] == sent
    assert report["stored_in_window"] == sent
    assert report["relay_error"] is None and report["relay_gaps"] == 0
    for field in ("e2e_p50_ms", "e2e_p99_ms", "stored_p50_ms", "stored_p99_ms",
                  "ack_p99_ms", "pipeline_cpu_pct", "middle_limit_ratio"):
        assert report[field] is not None and report[field] > 0, field
    assert report["e2e_p50_ms"] <= report["e2e_p99_ms"]
    assert report["stored_p50_ms"] <= report["stored_p99_ms"]
    assert report["up_exit_code"] == 0
    middle = report["middle_limit"]
    assert middle["ratio"] == report["middle_limit_ratio"]
    assert middle["middle_records_per_s"] > 0 and middle["bare_router_records_per_s"] > 0
    assert middle["ratio"] == pytest.approx(
        middle["middle_records_per_s"] / middle["bare_router_records_per_s"], rel=0.01)
