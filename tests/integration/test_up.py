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
import urllib.request
from pathlib import Path

import orjson
import pytest
from support.ports import free_port_block
from support.processes import ProcessGroup
from support.waiting import eventually
from websockets.asyncio.client import connect

from iotpipe.auth import CLIENT_AUDIENCE, issue_token

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def http_body(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


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
        await eventually(lambda: "iotpipe is up" in procs.log("up"), 30, "the up banner",
                         details=lambda: procs.log("up"))
        banner = procs.log("up")
        assert f"ws://127.0.0.1:{base}/v1/ingest" in banner
        assert f"ws://127.0.0.1:{base + 1}/v1/live" in banner
        secret = (data / "auth.secret").read_text().strip()
        assert len(secret) == 64 and (data / "auth.secret").stat().st_mode & 0o077 == 0
        # Live readings of the simulated fleet, by a class of the generated registry.
        token = issue_token(secret.encode(), "up-test", CLIENT_AUDIENCE, 600)
        readings: list[dict[str, object]] = []
        deadline = time.monotonic() + 30
        while not readings and time.monotonic() < deadline:
            with contextlib.suppress(OSError, TimeoutError):
                async with connect(f"ws://127.0.0.1:{base + 1}/v1/live",
                                   additional_headers={"Authorization": f"Bearer {token}"},
                                   open_timeout=5) as ws:
                    await ws.send('{"op":"subscribe","classes":["thermometer"]}')
                    while len(readings) < 20:
                        frame = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
                        if frame["event"] == "reading":
                            readings.append(frame)
            if not readings:
                await asyncio.sleep(0.5)
        # Devices 0 and 3 of the 5 are thermometers (kinds cycle thermometer, meter, pump).
        assert len(readings) >= 20 and {r["device"] for r in readings} <= {"sim-0", "sim-3"}
        assert all(isinstance(r["data"], dict) and "temp_c" in r["data"] for r in readings)
        # Stored in the embedded database under the data directory, enriched.
        db = data / "store" / "readings.db"
        await eventually(lambda: db.exists() and stored_count(db) >= 20, 30, "20 stored rows")
        first = orjson.loads(query(db, "--device", "sim-0", "--json", "--limit", "1"))
        assert first["class"] == "thermometer" and first["location"] == "plant-a/hall-1"
        # The printed live page URL works: the page, and the stored history through the
        # relay from storage's read API.
        page_url = re.search(r"live page\s+(http://\S+)", banner)
        assert page_url, banner
        assert b"/static/app.js" in await asyncio.to_thread(http_body, page_url.group(1))
        token_arg = page_url.group(1).split("?", 1)[1]
        history = orjson.loads(await asyncio.to_thread(
            http_body, f"http://127.0.0.1:{base + 1}/api/history?device=sim-0&{token_arg}"))
        assert history["available"] is True and history["readings"], history
        assert all("temp_c" in r["data"] for r in history["readings"])
        # A tier that dies is restarted by the supervisor.
        pids = child_pids(procs.log("up"))
        assert set(pids) == {"middle", "storage", "relay", "ingest", "simulate"}
        os.kill(pids["relay"][0], signal.SIGKILL)
        await eventually(lambda: "restarted relay" in procs.log("up"), 20, "a relay restart",
                         details=lambda: procs.log("up"))
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
        await eventually(lambda: "iotpipe is up" in procs.log("up"), 30, "the up banner")
        assert "auth        OFF" in procs.log("up")
        pids = [pid for group in child_pids(procs.log("up")).values() for pid in group]
        assert len(pids) == 4 and all(alive(pid) for pid in pids)
        up.kill()
        up.wait(timeout=10)
        await eventually(lambda: not any(alive(pid) for pid in pids), 30, "every child gone",
                         details=lambda: str([pid for pid in pids if alive(pid)]))
    finally:
        for group in child_pids(procs.log("up")).values():
            for pid in group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def metric(port: int, name: str) -> float:
    """The value of one sample on a tier's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name)]
    return sum(values)


def stored_ids(db: Path, device: str) -> set[int]:
    rows = [orjson.loads(line) for line in query(db, "--device", device, "--json").splitlines()]
    return {int(row["msg_id"]) for row in rows}


async def wait_up(procs: ProcessGroup, name: str) -> None:
    await eventually(lambda: "iotpipe is up" in procs.log(name), 60, "the up banner",
                     details=lambda: procs.log(name))


async def test_second_run_stores_new_readings_and_a_second_up_is_refused(
        procs: ProcessGroup, tmp_path: Path) -> None:
    """Issue 10, items 1, 2 and 6: ids are never reused across runs; a second `iotpipe up`
    on the same ports exits 1 naming the port and touches nothing of the first; `iotpipe
    watch` (subscribe-all) prints the live fleet."""
    base = free_port_block(9)
    data = tmp_path / "data"
    args = ("up", "--data-dir", str(data), "--base-port", str(base), "--simulate", "3",
            "--simulate-rate", "20", "--stop-timeout", "20")
    db = data / "store" / "readings.db"
    first = procs.iotpipe(*args, name="up-1")
    try:
        await wait_up(procs, "up-1")
        await eventually(lambda: db.exists() and stored_count(db) >= 30, 60, "30 stored rows")

        # A second instance on the same ports: refused before it starts or writes anything.
        logs = {p.name: p.read_bytes() for p in (data / "logs").iterdir()}
        registry = (data / "registry.yaml").read_bytes()
        started = time.monotonic()
        second = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "iotpipe.cli", *args],
            capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stderr
        assert f"port {base} (ingest) on 127.0.0.1 is in use" in second.stderr, second.stderr
        assert time.monotonic() - started < 30  # refused up front, never "up"
        assert "iotpipe is up" not in second.stdout and "started" not in second.stderr
        assert first.poll() is None
        assert (data / "registry.yaml").read_bytes() == registry
        for name, before in logs.items():
            after = (data / "logs" / name).read_bytes()
            assert after.startswith(before), name  # only the first instance appends
            assert b"Address already in use" not in after, name

        # iotpipe watch subscribes to everything: every simulated device shows up.
        token_env = {**os.environ, "IOTPIPE_AUTH_SECRET_FILE": str(data / "auth.secret")}
        watched = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "iotpipe.cli", "watch", "--json",
                             "--url", f"ws://127.0.0.1:{base + 1}/v1/live", "--count", "30"],
            capture_output=True, text=True, timeout=60, env=token_env)
        assert watched.returncode == 0, watched.stderr
        frames = [orjson.loads(line) for line in watched.stdout.splitlines()]
        assert frames[0]["event"] == "subscribed" and frames[0]["all"] is True
        readings = [f for f in frames if f["event"] == "reading"]
        assert len(readings) == 30
        assert {r["device"] for r in readings} == {"sim-0", "sim-1", "sim-2"}
        assert any("energy_kwh" in r["data"] for r in readings)  # sim-1 is a meter

        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 60) == 0, procs.log("up-1")
        assert "status -15" not in procs.log("up-1")
        before = {device: stored_ids(db, device) for device in ("sim-0", "sim-1", "sim-2")}
        count_before = stored_count(db)

        # The next run stores new readings from its first message on: none is taken for a
        # duplicate of the first run's (that was a minute of nothing stored).
        procs.iotpipe(*args, name="up-2")
        await wait_up(procs, "up-2")
        await eventually(lambda: stored_count(db) >= count_before + 30, 60,
                         "30 more stored rows")
        for device, old in before.items():
            new = stored_ids(db, device) - old
            # Ids restarting at 1 would have been dropped as duplicates until they passed
            # the first run's, so storage would resume exactly at max(old) + 1. This run's
            # ids start at its own start time in microseconds: far above.
            assert new and min(new) > max(old) + 1_000_000, (device, min(new), max(old))
        assert metric(base + 7, "iotpipe_storage_records_written_total") >= 30
    finally:
        for name in ("up-1", "up-2"):
            for group in child_pids(procs.log(name)).values():
                for pid in group:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)


async def test_bad_values_exit_2_and_start_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "iotpipe.cli", "up", "--data-dir", str(data),
                         "--log-level", "loud"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--log-level" in result.stderr and "'loud'" in result.stderr
    assert "iotpipe is up" not in result.stdout
    assert not data.exists()


async def test_up_never_says_up_when_a_tier_is_not_ready(tmp_path: Path) -> None:
    # No tier can answer /readyz within 10 ms of being spawned: up must give up, say which
    # tiers were not ready, stop everything it started and exit 1 without the banner.
    base = free_port_block(9)
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "iotpipe.cli", "up", "--data-dir",
                         str(tmp_path / "data"), "--base-port", str(base),
                         "--ready-timeout", "0.01"], capture_output=True, text=True, timeout=90)
    assert result.returncode == 1, result.stderr
    assert "iotpipe is up" not in result.stdout
    assert "not ready after 0.01s" in result.stderr
    assert re.findall(r"stopped (\w+)", result.stderr) == ["ingest", "relay", "storage", "middle"]
