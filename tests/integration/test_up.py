"""``iotpipe up``: the whole pipeline under the local supervisor, as ``make up`` runs it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from conftest import ProcessGroup, free_port_block
from websockets.asyncio.client import connect

from integration.support import eventually
from iotpipe.auth import CLIENT_AUDIENCE, issue_token

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def child_pids(log: str) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for name, pid in re.findall(r"(?:started|restarted) (\w+) \(pid (\d+)\)", log):
        pids.setdefault(name, []).append(int(pid))
    return pids


def query(db: Path, *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "iotpipe.cli", "query", "--db", str(db),
                             *args], capture_output=True, timeout=30, check=True)
    return result.stdout.decode()


def stored_count(db: Path) -> int:
    return int(query(db, "--count").strip())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the supervisor) counts as dead.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


async def test_up_runs_restarts_and_stops_everything(procs: ProcessGroup,
                                                     tmp_path: Path) -> None:
    base = free_port_block(9)
    data = tmp_path / "data"
    up = procs.iotpipe("up", "--data-dir", str(data), "--base-port", str(base),
                       "--simulate", "5", "--simulate-rate", "20", "--stop-timeout", "20",
                       name="up")
    pids: dict[str, list[int]] = {}
    try:
        assert await eventually(lambda: "iotpipe is up" in procs.log("up"), within_s=30), \
            procs.log("up")
        banner = procs.log("up")
        assert f"ws://127.0.0.1:{base}/v1/ingest" in banner
        assert f"ws://127.0.0.1:{base + 1}/v1/live" in banner
        secret = (data / "auth.secret").read_text().strip()
        assert len(secret) == 64 and (data / "auth.secret").stat().st_mode & 0o077 == 0
        # Live readings of the simulated fleet, enriched class from the sample registry.
        token = issue_token(secret.encode(), "up-test", CLIENT_AUDIENCE, 600)
        readings: list[dict[str, object]] = []
        deadline = time.monotonic() + 30
        while not readings and time.monotonic() < deadline:
            with contextlib.suppress(OSError, TimeoutError):
                async with connect(f"ws://127.0.0.1:{base + 1}/v1/live",
                                   additional_headers={"Authorization": f"Bearer {token}"},
                                   open_timeout=5) as ws:
                    await ws.send('{"op":"subscribe","classes":["simulated"]}')
                    while len(readings) < 20:
                        frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                        if frame["event"] == "reading":
                            readings.append(frame)
            if not readings:
                await asyncio.sleep(0.5)
        assert len(readings) >= 20 and all(str(r["device"]).startswith("sim-")
                                           for r in readings)
        # Stored in the embedded database under the data directory, enriched.
        db = data / "store" / "readings.db"
        assert await eventually(lambda: db.exists() and stored_count(db) >= 20, within_s=30)
        first = orjson.loads(query(db, "--device", "sim-0", "--json", "--limit", "1"))
        assert first["class"] == "simulated" and first["location"] == "local"
        # A tier that dies is restarted by the supervisor.
        pids = child_pids(procs.log("up"))
        assert set(pids) == {"middle", "storage", "relay", "ingest", "simulate"}
        os.kill(pids["relay"][0], signal.SIGKILL)
        assert await eventually(lambda: "restarted relay" in procs.log("up"), within_s=20), \
            procs.log("up")
        # SIGTERM stops every child in order and exits 0.
        up.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(up.wait, 60) == 0, procs.log("up")
        log = procs.log("up")
        order = re.findall(r"stopped (\w+)", log)
        assert order == ["simulate", "ingest", "relay", "storage", "middle"], log
        pids = child_pids(log)
        assert not [pid for group in pids.values() for pid in group if alive(pid)]
    finally:
        # The children run in their own sessions: never leave one behind.
        for group in child_pids(procs.log("up")).values():
            for pid in group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


async def test_children_stop_when_the_supervisor_is_killed(procs: ProcessGroup,
                                                           tmp_path: Path) -> None:
    base = free_port_block(9)
    up = procs.iotpipe("up", "--data-dir", str(tmp_path / "data"), "--base-port", str(base),
                       "--insecure-no-auth", "--drain-timeout", "3", name="up")
    try:
        assert await eventually(lambda: "iotpipe is up" in procs.log("up"), within_s=30)
        assert "auth        OFF" in procs.log("up")
        pids = [pid for group in child_pids(procs.log("up")).values() for pid in group]
        assert len(pids) == 4 and all(alive(pid) for pid in pids)
        up.kill()
        up.wait(timeout=10)
        assert await eventually(lambda: not any(alive(pid) for pid in pids), within_s=30), \
            [pid for pid in pids if alive(pid)]
    finally:
        for group in child_pids(procs.log("up")).values():
            for pid in group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
