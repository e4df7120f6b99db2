"""Smoke test of ``iotpipe bench ingest --json``: it runs and reports the right shape
(speed is never asserted here; the benchmark itself measures it)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from support.ports import free_port
from support.processes import run_bounded

pytestmark = [pytest.mark.bench, pytest.mark.timeout(240)]


def test_bench_ingest_json_shape() -> None:
    done = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "ingest", "--json",
         "--connections", "10", "--inflight", "2", "--duration", "1", "--warmup", "0.3"],
        capture_output=True, text=True, timeout=230,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["bench"] == "ingest"
    for name in ("picows", "websockets", "ingest"):
        result = report["results"][name]
        assert result["connections"] == 10
        assert result["errors"] == 0
        assert result["acked"] > 0 and result["acked_per_s"] > 0
        for field in ("server_cpu_pct", "acks_per_cpu_s", "p50_ms", "p99_ms",
                      "cpu_ratio_vs_picows"):
            assert result[field] is not None and result[field] > 0, field
        assert result["p50_ms"] <= result["p99_ms"]
    assert report["results"]["picows"]["cpu_ratio_vs_picows"] == 1.0
    assert report["cpu_ratio_vs_picows"] == report["results"]["ingest"]["cpu_ratio_vs_picows"]
    # The SIGTERM drain forwarded every acked message to the fake middle before exiting.
    ingest = report["results"]["ingest"]
    assert ingest["drain_exit_code"] == 0
    assert ingest["middle_records"] >= ingest["acked"]
    # The open-loop run at half of ingest's maximum, every server at the same rate.
    half = report["half_rate"]
    assert half["rate"] == pytest.approx(ingest["acked_per_s"] / 2, rel=0.01)
    assert report["p99_ms_at_half"] == half["ingest"]["p99_ms"] > 0
    for name in ("picows", "websockets", "ingest"):
        assert half[name]["acked_per_s"] > 0


def test_fake_middle_stops_on_sigint_even_when_started_with_sigint_ignored() -> None:
    # A bench started in the background (nohup, &) hands its children SIGINT ignored.
    from iotpipe_tools.bench.ingest import _MIDDLE

    proc = subprocess.Popen(
        [sys.executable, "-c", _MIDDLE, f"tcp://127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
        assert out.strip().splitlines()[-1] == "0"  # the records it was sent: none
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
