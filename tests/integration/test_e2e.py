"""Devices -> ingest -> middle -> storage and relay, all real processes on loopback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest
from support.devices import Fleet, LiveClient, check_live_stream
from support.pipeline import SECRET, Pipeline, assert_stored_exactly_once, metric_value
from support.processes import ProcessGroup
from support.waiting import eventually

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def test_fleet_to_storage_and_live_clients(procs: ProcessGroup, tmp_path: Path) -> None:
    pipeline = Pipeline(procs, tmp_path,
                        relay_args=["--stall-timeout", "3"])
    pipeline.start_all()
    devices = [f"dev-{i:03d}" for i in range(40)]
    fleet = Fleet(pipeline.ingest_url, {d: pipeline.device_token(d) for d in devices},
                  batch=5, interval=0.02, per_device=50, pad=3000)
    stop_live = asyncio.Event()
    everything = LiveClient(pipeline.relay_url, pipeline.client_token("all"),
                            {"prefixes": ["dev-"]})
    one_device = LiveClient(pipeline.relay_url, pipeline.client_token("one"),
                            {"devices": ["dev-007"]})
    boilers = LiveClient(pipeline.relay_url, pipeline.client_token("boilers"),
                         {"classes": ["boiler"]})
    clients = [everything, one_device, boilers]
    live_tasks = [asyncio.create_task(c.run(stop_live)) for c in clients]
    # A client that completes the handshake, subscribes to everything and never reads.
    stuck = await asyncio.to_thread(never_reading_client, pipeline, "dev-")
    try:
        await asyncio.wait_for(asyncio.gather(*(c.subscribed.wait() for c in clients)), 10)
        # PUB/SUB joins asynchronously: the relay is subscribed once its SUB finished the
        # handshake with the middle (the subscription travels in it), which the middle's
        # readiness does not tell. Wait for exactly that, as the relay reports it.
        await eventually(lambda: (metric_value(
            pipeline.metrics("relay"), "iotpipe_relay_upstreams_connected") or 0) >= 1,
            30, "the relay's upstream connection", details=lambda: procs.log("relay")[-2000:])
        await asyncio.wait_for(fleet.run(asyncio.Event()), timeout=90)
        assert fleet.errors == Counter(), fleet.errors
        assert fleet.total_acked() == 40 * 50
        rows = assert_stored_exactly_once(pipeline, fleet)
        # Enrichment from the registry: exact id first, then the longest prefix.
        by_key = {(r["device_id"], r["msg_id"]): r for r in rows}
        assert by_key[("dev-000", "dev-000.0")]["class"] == "boiler"
        assert by_key[("dev-000", "dev-000.0")]["labels"] == {"line": "1"}
        assert by_key[("dev-001", "dev-001.0")]["location"] == "hall-2"
        assert by_key[("dev-005", "dev-005.3")]["data"] == {
            "n": 3, "device": "dev-005", **{f"p{i}": "x" * 200 for i in range(15)}}
        # By device and time range through the query command.
        one = [orjson.loads(line) for line in
               pipeline.query("--device", "dev-007", "--json").splitlines()]
        assert sorted(r["msg_id"] for r in one) == sorted(f"dev-007.{n}" for n in range(50))
        assert pipeline.query("--device", "dev-007", "--since", "2100-01-01T00:00:00Z",
                              "--count").strip() == "0"
        # The stuck client was sent ~6 MB, more than socket buffers hold: frames wait in its
        # queue, so the stall timeout (3 s) cuts it off instead of it holding anything back.
        def slow_closes() -> float:
            return metric_value(pipeline.metrics("relay"), "iotpipe_relay_slow_closes_total") or 0

        await eventually(lambda: slow_closes() >= 1, 20, "the stuck client to be closed",
                         details=lambda: procs.log("relay")[-2000:])
        # The last live events may still be on their way (storage acks do not wait for
        # them): wait until every healthy client has what it should, then stop them.
        await eventually(lambda: len(everything.readings()) >= 40 * 50
                         and len(one_device.readings()) >= 50
                         and len(boilers.readings()) >= 50, 30, "every live reading")
    finally:
        stop_live.set()
        await asyncio.gather(*live_tasks)
        stuck.close()
    # Live: every reading of the healthy clients arrived, in order, with nothing missed.
    totals = check_live_stream(everything.connections)
    assert totals.get("slow_missed", 0) == 0 and totals.get("upstream_missed", 0) == 0, totals
    live_keys = [(f["device"], f["id"]) for f in everything.readings()]
    assert len(live_keys) == len(set(live_keys)) == 40 * 50
    assert {(f["device"]) for f in one_device.readings()} == {"dev-007"}
    assert len(one_device.readings()) == 50
    assert {(f["device"]) for f in boilers.readings()} == {"dev-000"}
    assert len(boilers.readings()) == 50
    reading = one_device.readings()[0]
    assert reading["source"] == "mid-0" and reading["data"]["device"] == "dev-007"  # type: ignore[index]
    # No connection outlived its client (the relay notices closes asynchronously).
    await eventually(lambda: metric_value(pipeline.metrics("relay"),
                                          "iotpipe_relay_clients") == 0, 10, "no relay clients")
    assert '"msg":"closing slow client","client":"stuck#' in procs.log("relay")


def never_reading_client(pipeline: Pipeline, prefix: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
    sock.settimeout(5)
    sock.connect(("127.0.0.1", pipeline.ports["relay"]))
    sock.sendall(
        b"GET /v1/live HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer "
        + pipeline.client_token("stuck").encode() + b"\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    payload = orjson.dumps({"op": "subscribe", "prefixes": [prefix]})
    mask = b"\x05\x06\x07\x08"
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask
                 + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return sock


async def test_simulator_acks_are_all_stored(procs: ProcessGroup, tmp_path: Path) -> None:
    """`iotpipe simulate --acked-file` against the real pipeline: every ack is in storage."""
    pipeline = Pipeline(procs, tmp_path)
    pipeline.start_all()
    acked_file = tmp_path / "acked.tsv"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "iotpipe.cli", "simulate", "--url", pipeline.ingest_url,
         "--connections", "50", "--messages", "40", "--batch", "4", "--duration", "30",
         "--device-prefix", "dev-", "--secret", SECRET, "--acked-file", str(acked_file),
         "--json"],
        capture_output=True, timeout=90, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    acked = {tuple(line.split("\t")) for line in acked_file.read_text().splitlines() if line}
    assert len(acked) == 50 * 40
    assert pipeline.wait_stored(len(acked), timeout=60) == len(acked)
    stored = {(str(r["device_id"]), str(r["msg_id"])) for r in pipeline.stored()}
    assert acked == stored
