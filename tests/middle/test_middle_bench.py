"""Smoke test of ``iotpipe bench middle``: it runs and prints the documented JSON shape."""

from __future__ import annotations

import json
import sys

import pytest
from support.processes import run_bounded

pytestmark = [pytest.mark.bench, pytest.mark.timeout(120)]


def test_bench_middle_json_shape(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "middle", "--json", "--batches", "1,8",
         "--seconds", "0.5", "--warmup", "0.2", "--nodes", "2", "--window", "2",
         "--log-bytes", str(1 << 24), "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=100, check=True,
    )
    report = json.loads(out.stdout)
    assert report["bench"] == "middle"
    assert [row["batch"] for row in report["results"]] == [1, 8]
    for row in report["results"]:
        assert row["records_per_s"] > 0 and row["batches_per_s"] > 0
        assert row["bare_records_per_s"] > 0 and row["ratio"] > 0
        assert row["ack_p99_ms"] >= row["ack_p50_ms"] > 0
        assert row["records_per_cpu_s"] > 0 and row["bare_records_per_cpu_s"] > 0
        # the durable baseline acknowledged too, and its ratio is the one reported
        assert row["durable_bare_records_per_s"] > 0
        assert row["durable_bare_records_per_cpu_s"] > 0
        assert row["durable_ratio"] == round(
            row["records_per_s"] / row["durable_bare_records_per_s"], 3)
    assert not list(tmp_path.iterdir()), "the temporary log was not removed"


def test_bench_middle_curve_reports_the_ratio(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "middle", "--json", "--batches", "8",
         "--seconds", "0.5", "--warmup", "0.2", "--nodes", "2", "--window", "2",
         "--log-bytes", str(1 << 24), "--dir", str(tmp_path), "--no-baseline", "--curve"],
        capture_output=True, text=True, timeout=100, check=True,
    )
    (row,) = json.loads(out.stdout)["results"]
    # The CURVE run got acks (its clients were admitted), so the ratio is a real one.
    assert row["curve_records_per_s"] > 0 and row["curve_records_per_cpu_s"] > 0
    assert row["curve_ratio"] == round(row["curve_records_per_s"] / row["records_per_s"], 3)
    assert not list(tmp_path.iterdir()), "the temporary log and keys were not removed"
