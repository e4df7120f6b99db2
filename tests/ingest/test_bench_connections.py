"""Smoke test of ``iotpipe bench connections --json`` at 10,000 connections: every
connection is held through keepalive pings and gets its one message acked (memory and
time are reported, never asserted)."""

from __future__ import annotations

import json
import sys

import pytest
from support.processes import run_bounded

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]

CONNECTIONS = 10_000


def test_bench_connections_holds_and_acks_ten_thousand() -> None:
    done = run_bounded(
        [sys.executable, "-m", "iotpipe.cli", "bench", "connections", "--json",
         # Pings every 10 s (a pong is due within that): at 5 s, a CI machine loaded by
         # other work lost ~5% of the connections to keepalive while they were connecting.
         "--connections", str(CONNECTIONS), "--hold", "2", "--ping-interval", "10"],
        capture_output=True, text=True, timeout=590,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["bench"] == "connections"
    for name in ("picows", "ingest"):
        result = report["results"][name]
        assert result["held"] == CONNECTIONS and result["connect_failed"] == 0
        assert result["acked"] == CONNECTIONS and result["errors"] == 0
        assert result["rss_bytes"] > result["idle_rss_bytes"] > 0
        assert result["bytes_per_connection"] > 0 and result["connect_s"] > 0
        assert result["listen_overflows"] >= 0  # machine-wide: not asserted to be 0
    ingest = report["results"]["ingest"]
    assert (report["held"], report["acked"]) == (CONNECTIONS, CONNECTIONS)
    assert report["bytes_per_connection"] == ingest["bytes_per_connection"]
    assert report["memory_ratio_vs_picows"] > 0
    # Every acked message reached the fake middle through the drain on SIGTERM.
    assert ingest["drain_exit_code"] == 0 and ingest["middle_records"] == CONNECTIONS
