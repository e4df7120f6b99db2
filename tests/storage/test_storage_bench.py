"""Smoke test of ``iotpipe bench storage``: it runs and reports the documented shape."""

from __future__ import annotations

import json
import sys

import pytest
from support.processes import run_bounded

pytestmark = pytest.mark.bench


def test_bench_storage_json_shape() -> None:
    result = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "storage", "--records", "600",
         "--delivery", "100", "--window", "200", "--json"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["bench"] == "storage"
    assert [row["batch"] for row in report["sink"]] == [1, 64, 100, 2048]
    for row in report["sink"]:
        assert row["records_per_s"] > 0 and row["plain_records_per_s"] > 0 and row["ratio"] > 0
    e2e = report["end_to_end"]
    assert (e2e["records"], e2e["delivery"], e2e["window"]) == (600, 100, 200)
    assert e2e["records_per_s"] > 0
