"""Smoke test of ``iotpipe bench queue``: tiny counts, checks the JSON shape (not speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from support.processes import run_bounded

pytestmark = pytest.mark.bench


def test_bench_queue_json_shape(tmp_path: Path) -> None:
    result = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "queue", "--json", "--seconds", "0.04",
         "--slices", "2", "--batches", "1,16", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert report["bench"] == "queue"
    assert report["record_bytes"] == 128
    assert {"python", "cpus", "filesystem"} <= report["machine"].keys()
    modes = {r["mode"] for r in report["results"]}
    assert "fdatasync" in modes
    for mode in modes:
        assert sorted(r["batch"] for r in report["results"] if r["mode"] == mode) == [1, 16]
    for r in report["results"]:
        assert r["records_per_s"] > 0 and r["plain_records_per_s"] > 0
        assert r["framing_records_per_s"] > 0 and r["written_plain_records_per_s"] > 0
        assert r["written_limit_ratio"] == pytest.approx(
            r["records_per_s"] / r["written_plain_records_per_s"], rel=0.01)
        assert r["limit_ratio"] == pytest.approx(r["records_per_s"] / r["plain_records_per_s"],
                                                 rel=0.01)
        if r["mode"] == "pmem":
            assert isinstance(r["pmem_is_pmem_forced"], bool)
    assert [r["batch"] for r in report["reads"]] == [1, 16]
    for r in report["reads"]:
        assert r["read_records_per_s"] > 0 and r["plain_read_records_per_s"] > 0
        assert r["parse_records_per_s"] > 0 and r["parse_python_records_per_s"] > 0
        assert r["read_limit_ratio"] == pytest.approx(
            r["read_records_per_s"] / r["plain_read_records_per_s"], rel=0.01)
        assert r["parse_c_vs_python"] == pytest.approx(
            r["parse_records_per_s"] / r["parse_python_records_per_s"], rel=0.02)
    assert list(tmp_path.iterdir()) == []  # scratch files are removed


def test_bench_queue_rejects_a_bad_batch_size() -> None:
    result = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "queue", "--batches", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--batches" in result.stderr and "positive" in result.stderr
