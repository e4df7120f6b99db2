"""The simulator: its pure helpers, and full runs against an in-process ingest server."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.ingest import SECRET, FakeMiddle

from iotpipe.ingest.server import IngestServer, IngestSettings
from iotpipe_tools.simulate import SimulateSettings, SimulationReport, run_simulation
from iotpipe_tools.simulate.payloads import message_data
from iotpipe_tools.simulate.report import LATENCY_SAMPLES, AckedIds
from iotpipe_tools.sources import source_addresses


@pytest.mark.unit
def test_source_addresses_spread_only_for_ipv4_loopback() -> None:
    assert source_addresses("ws://127.0.0.1:1/v1/ingest", 10, True) == ["127.0.0.2"]
    assert source_addresses("ws://127.0.0.1:1/v1/ingest", 45000, True) == \
        ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert source_addresses("ws://127.0.0.1:1/", 45000, False) == [None]
    assert source_addresses("ws://example.com:1/", 45000, True) == [None]
    assert source_addresses("ws://[::1]:1/", 45000, True) == [None]


@pytest.mark.unit
@pytest.mark.parametrize("size", [16, 64, 300, 1000])
def test_message_size_is_close_to_requested(size: int) -> None:
    encoded = orjson.dumps({"id": 123456, "data": message_data(size, 123456)})
    assert abs(len(encoded) - size) <= max(24, size // 10)
    assert all(len(v) <= 256 for v in message_data(size, 1).values() if isinstance(v, str))


@pytest.mark.unit
def test_report_ok_and_percentiles() -> None:
    report = SimulationReport(connections=1, sent=4, acked=4, acked_at_stop=4, send_elapsed_s=2.0,
                              latencies_s=[0.001, 0.002, 0.003, 0.100])
    assert report.ok
    summary = report.to_dict()
    assert summary["acks_per_s"] == 2.0
    assert summary["ack_latency_ms"] == {"p50": 2.0, "p99": 100.0}
    report.errors["rate_limited"] += 3  # retried: still fine
    assert report.ok
    report.errors["bad_data"] += 1
    assert not report.ok
    assert not SimulationReport(acked=4, unacked=1).ok
    assert not SimulationReport(acked=4, never_connected=1).ok
    assert not SimulationReport(acked=4, duplicate_acks=1).ok


@pytest.mark.unit
def test_acked_ids_keep_only_gaps() -> None:
    acked = AckedIds()
    for msg_id in [1, 2, 5, 3, 7, 2]:
        acked.add(msg_id)
    assert acked.floor == 3
    assert list(acked) == [1, 2, 3, 5, 7]
    assert len(acked) == 5
    assert 2 in acked and 5 in acked and 4 not in acked and 0 not in acked
    acked.add(4)
    acked.add(6)
    assert acked.floor == 7 and list(acked) == list(range(1, 8))


@pytest.mark.unit
def test_latency_reservoir_stays_bounded() -> None:
    report = SimulationReport()
    for i in range(LATENCY_SAMPLES + 5000):
        report.add_latency(i * 1e-6)
    assert len(report.latencies_s) == LATENCY_SAMPLES
    assert report.latency_count == LATENCY_SAMPLES + 5000
    p50 = report.percentile(0.5)
    assert p50 is not None and 0.08 < p50 < 0.12


@pytest.fixture
async def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> AsyncIterator[tuple[IngestServer, FakeMiddle]]:
    monkeypatch.setenv("IOTPIPE_AUTH_SECRET", SECRET)
    middle = FakeMiddle()
    ingest = IngestServer(IngestSettings(
        host="127.0.0.1", port=0, data_dir=tmp_path / "q", node_id="sim-test",
        middle_endpoints=[middle.endpoint], rate_limit=200, rate_burst=20,  # flood_limit 20
    ), 0)
    await ingest.start()
    yield ingest, middle
    await ingest.aclose()
    middle.close()


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_simulate_cli_checks_every_ack_and_writes_acked_file(
        server: tuple[IngestServer, FakeMiddle], tmp_path: Path) -> None:
    ingest, middle = server
    acked_file = tmp_path / "acked.tsv"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "iotpipe.cli", "simulate", "--json",
        "--url", f"ws://127.0.0.1:{ingest.port}/v1/ingest", "--secret", SECRET,
        "--connections", "4", "--messages", "30", "--batch", "3", "--rate", "100",
        "--acked-file", str(acked_file), stdout=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode == 0
    report: dict[str, Any] = json.loads(stdout)
    assert report["ok"] and report["acked"] == 120 and report["sent"] == 120
    assert report["unacked"] == 0 and report["duplicate_acks"] == 0
    assert report["ack_latency_ms"]["p50"] is not None
    lines = {tuple(line.split("\t")) for line in acked_file.read_text().splitlines()}
    assert len(lines) == 120
    assert middle.wait_for(lambda m: lines <= m.messages(), 10)


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_simulator_retries_rate_limited_messages_until_acked(
        server: tuple[IngestServer, FakeMiddle]) -> None:
    ingest, middle = server
    # 2 devices x 600 messages, as fast as possible, against 200 msg/s (burst 20) per device.
    report = await run_simulation(SimulateSettings(
        url=f"ws://127.0.0.1:{ingest.port}/v1/ingest", secret=SECRET, connections=2,
        messages=600, batch=10, inflight=4, duration=30))
    assert report.errors["rate_limited"] > 0
    assert report.ok, report.to_dict()
    assert report.acked == 1200
    assert not report.closes  # it honoured the retry hints: never closed as a flood
    acked = {(d, str(i)) for d, ids in report.acked_ids.items() for i in ids}
    assert middle.wait_for(lambda m: acked <= m.messages(), 10)


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_simulator_reports_refused_connections(
        server: tuple[IngestServer, FakeMiddle]) -> None:
    ingest, _ = server
    report = await run_simulation(SimulateSettings(
        url=f"ws://127.0.0.1:{ingest.port}/v1/ingest",
        secret="wrong-secret-wrong-secret-wrong-secret", connections=3, messages=1))
    assert report.connect_failures == {"http_401": 3}
    # The server's reason is shown, not only the status.
    [(refusal, count)] = report.refusals.items()
    assert count == 3 and refusal.startswith("HTTP 401 bad_signature"), refusal
    assert report.to_dict()["refusals"] == {refusal: 3}
    assert not report.ok


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_simulator_takes_the_secret_from_the_secret_file(
        server: tuple[IngestServer, FakeMiddle], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ingest, _ = server
    secret_file = tmp_path / "auth.secret"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.delenv("IOTPIPE_AUTH_SECRET", raising=False)
    monkeypatch.setenv("IOTPIPE_AUTH_SECRET_FILE", str(secret_file))
    report = await run_simulation(SimulateSettings(
        url=f"ws://127.0.0.1:{ingest.port}/v1/ingest", connections=2, messages=5))
    assert report.ok, report.to_dict()
    assert report.acked == 10
    monkeypatch.delenv("IOTPIPE_AUTH_SECRET_FILE")
    with pytest.raises(ValueError, match="give --secret or --insecure; no auth secret"):
        await run_simulation(SimulateSettings(
            url=f"ws://127.0.0.1:{ingest.port}/v1/ingest", connections=1, messages=1))
