"""Real ``iotpipe ingest`` processes: SIGTERM drain under load, kill -9 + restart, ``iotpipe
drain``, and several processes on one port."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from support.ingest import (
    SECRET,
    FakeMiddle,
    acked_pairs,
    children_of,
    node_identity,
    queue_depth,
    simulate,
    wait_ready,
)
from support.ports import free_port
from support.processes import ProcessGroup
from support.waiting import eventually, http_status

from iotpipe_tools.simulate import run_simulation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ENV = {"IOTPIPE_AUTH_SECRET": SECRET}


def start_ingest(procs: ProcessGroup, data_dir: Path, middle: FakeMiddle, name: str,
                 *extra: str) -> tuple[subprocess.Popen[bytes], int, int]:
    port, metrics_port = free_port(), free_port()
    proc = procs.iotpipe(
        "ingest", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
        str(metrics_port), "--data-dir", str(data_dir), "--node-id", "node",
        "--middle-endpoints", middle.endpoint,
        # The simulator sends as fast as it can; on a fast machine that is a flood (closed
        # with 1008) under the default per-device limit. Floods are tested in test_server.
        "--rate-limit", "0", *extra, name=name, env=ENV,
    )
    try:
        wait_ready(metrics_port)
    except TimeoutError:
        raise AssertionError(procs.log(name)) from None
    return proc, port, metrics_port


def metric(metrics_port: int, name: str) -> float:
    """The sum of the samples of ``name`` on an ingest's /metrics (0 when unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                    timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and line[len(name)] in " {")


async def test_sigterm_drain_under_load_loses_nothing(procs: ProcessGroup,
                                                      tmp_path: Path) -> None:
    # A slow middle (1 batch of 50 in flight, 20 ms per ack) lets the queue build up.
    middle = FakeMiddle(delay=0.02)
    try:
        proc, port, metrics_port = start_ingest(
            procs, tmp_path / "q", middle, "ingest", "--forward-window", "1",
            "--forward-batch", "50", "--drain-timeout", "60", "--drain-close-rate", "50")
        sim = asyncio.create_task(run_simulation(simulate(port, connections=20, duration=4,
                                                          batch=5)))
        # Under load, with every device connected (what the drain must close) and enough
        # acked for the checks below: not after a guessed delay.
        await eventually(lambda: metric(metrics_port, "iotpipe_ingest_connections") == 20
                         and metric(metrics_port, "iotpipe_ingest_messages_accepted_total") > 600,
                         30.0, "20 devices connected and 600 messages acked")
        proc.send_signal(signal.SIGTERM)
        readyz = f"http://127.0.0.1:{metrics_port}/readyz"
        await eventually(lambda: http_status(readyz) != 200, 30.0, "/readyz to leave 200",
                         interval=0.01)
        assert http_status(readyz) in (503, 0)  # 503 while draining (0: already exited)
        assert "draining" in procs.log("ingest")
        report = await sim
        rc = await asyncio.to_thread(proc.wait, 60)
        assert rc == 0, procs.log("ingest")
        assert report.acked > 500
        assert report.closes.get("1001", 0) >= 1
        assert acked_pairs(report) <= middle.messages()
        assert queue_depth(tmp_path / "q" / "p0") == 0
    finally:
        middle.close()


async def test_kill9_after_acks_then_restart_delivers_everything(procs: ProcessGroup,
                                                                 tmp_path: Path) -> None:
    silent = FakeMiddle(mode="silent")
    acking = FakeMiddle()
    try:
        proc, port, metrics_port = start_ingest(procs, tmp_path / "q", silent, "ingest1")
        sim = asyncio.create_task(run_simulation(simulate(port, connections=10, duration=5,
                                                          batch=3)))
        await eventually(lambda: metric(metrics_port, "iotpipe_ingest_messages_accepted_total")
                         > 150, 30.0, "150 messages acked")
        os.kill(proc.pid, signal.SIGKILL)  # mid-load, acks flowing
        report = await sim
        assert report.acked > 100
        assert not silent.stored
        proc.wait(10)
        start_ingest(procs, tmp_path / "q", acking, "ingest2")
        expected = acked_pairs(report)
        assert acking.wait_for(lambda m: expected <= m.messages(), 20), \
            len(expected - acking.messages())
        assert acking.nodes == {node_identity(tmp_path / "q" / "p0", "node-p0")}
    finally:
        silent.close()
        acking.close()


async def test_drain_command_forwards_a_retained_queue(procs: ProcessGroup,
                                                       tmp_path: Path) -> None:
    silent = FakeMiddle(mode="silent")
    acking = FakeMiddle()
    try:
        proc, port, _ = start_ingest(procs, tmp_path / "q", silent, "ingest")
        report = await run_simulation(simulate(port, connections=5, messages=40, batch=4))
        assert report.ok and report.acked == 200
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

        def drain(endpoint: str, timeout: str, data_dir: Path = tmp_path / "q"
                  ) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "iotpipe.cli", "drain", "--data-dir", str(data_dir),
                 "--node-id", "node", "--middle-endpoints", endpoint, "--timeout", timeout],
                capture_output=True, text=True, timeout=60,
            )

        # Nowhere to deliver: the drain times out non-zero and the queue stays intact.
        stuck = await asyncio.to_thread(drain, silent.endpoint, "1")
        assert stuck.returncode == 1, stuck.stderr
        assert queue_depth(tmp_path / "q" / "p0") == 200
        done = await asyncio.to_thread(drain, acking.endpoint, "30")
        assert done.returncode == 0, done.stderr
        assert acked_pairs(report) <= acking.messages()
        # The drain forwards under the pod's own identity, so the middle deduplicates.
        assert acking.nodes == {node_identity(tmp_path / "q" / "p0", "node-p0")}
        assert queue_depth(tmp_path / "q" / "p0") == 0
        missing = await asyncio.to_thread(drain, acking.endpoint, "5", tmp_path / "none")
        assert missing.returncode == 2 and "not a directory" in missing.stderr
    finally:
        silent.close()
        acking.close()


async def test_processes_share_one_port_with_separate_queues(procs: ProcessGroup,
                                                             tmp_path: Path) -> None:
    middle = FakeMiddle()
    try:
        port, metrics_port = free_port(), free_port()  # the pod's one metrics port
        parent = procs.iotpipe(
            "ingest", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
            str(metrics_port), "--data-dir", str(tmp_path / "q"), "--node-id", "node",
            "--middle-endpoints", middle.endpoint, "--processes", "2",
            name="parent", env=ENV)
        wait_ready(metrics_port)
        report = await run_simulation(simulate(port, connections=40, messages=10,
                                               spread_sources=False))
        assert report.ok, report.to_dict()
        assert middle.wait_for(lambda m: acked_pairs(report) <= m.messages(), 10)
        assert middle.nodes == {node_identity(tmp_path / "q" / f"p{i}", f"node-p{i}")
                                for i in (0, 1)}
        assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["p0", "p1"]
        # A child that dies is restarted by the parent, with the same queue and port.
        before = children_of(parent.pid)
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        await eventually(lambda: len(now := children_of(parent.pid)) == 2 and before[0] not in now,
                         20, "the killed child replaced")
        wait_ready(metrics_port)  # the pod's readiness covers the restarted child too
        again = await run_simulation(simulate(port, connections=10, messages=5,
                                              spread_sources=False, first_device=100))
        assert again.ok, again.to_dict()
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(parent.wait, 60) == 0, procs.log("parent")
    finally:
        middle.close()


def test_ingest_refuses_to_start_without_secret_or_middle(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "iotpipe.cli", "ingest", "--data-dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
    no_middle = subprocess.run(base, capture_output=True, text=True, timeout=30, env=env)
    assert no_middle.returncode == 2 and "--middle-endpoints" in no_middle.stderr
    no_secret = subprocess.run([*base, "--middle-endpoints", "tcp://127.0.0.1:1"],
                               capture_output=True, text=True, timeout=30, env=env)
    assert no_secret.returncode == 2 and "IOTPIPE_AUTH_SECRET" in no_secret.stderr
    bad_endpoint = subprocess.run([*base, "--middle-endpoints", "middle-0:5555",
                                   "--insecure-no-auth"],
                                  capture_output=True, text=True, timeout=30, env=env)
    assert bad_endpoint.returncode == 2 and "'middle-0:5555'" in bad_endpoint.stderr
    bad_number = subprocess.run([*base, "--middle-endpoints", "tcp://x:1", "--port", "http"],
                                capture_output=True, text=True, timeout=30, env=env)
    assert bad_number.returncode == 2 and "--port" in bad_number.stderr
    # picows has no permessage-deflate: asking for both is refused, naming the way out.
    deflate = subprocess.run([*base, "--middle-endpoints", "tcp://127.0.0.1:1",
                              "--insecure-no-auth", "--compression", "--ws-core", "picows"],
                             capture_output=True, text=True, timeout=30, env=env)
    assert deflate.returncode == 2 and "--ws-core websockets" in deflate.stderr
    bad_core = subprocess.run([*base, "--middle-endpoints", "tcp://127.0.0.1:1",
                               "--insecure-no-auth", "--ws-core", "uvicorn"],
                              capture_output=True, text=True, timeout=30, env=env)
    assert bad_core.returncode == 2 and "--ws-core" in bad_core.stderr


async def test_simulator_reconnects_through_an_ingest_restart(procs: ProcessGroup,
                                                              tmp_path: Path) -> None:
    middle = FakeMiddle()
    try:
        port, metrics_port = free_port(), free_port()
        args = ("ingest", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
                str(metrics_port), "--data-dir", str(tmp_path / "q"), "--node-id", "node",
                "--middle-endpoints", middle.endpoint)
        first = procs.iotpipe(*args, name="first", env=ENV)
        wait_ready(metrics_port)
        sim = asyncio.create_task(run_simulation(simulate(
            port, connections=10, messages=300, rate=100, batch=5, reconnect=True,
            duration=20)))
        # Every device connected and sending (each must reconnect after the kill).
        await eventually(lambda: metric(metrics_port, "iotpipe_ingest_connections") == 10
                         and metric(metrics_port, "iotpipe_ingest_messages_accepted_total") > 0,
                         30.0, "10 devices connected and sending")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        await asyncio.sleep(0.5)
        procs.iotpipe(*args, name="second", env=ENV)
        report = await sim
        assert report.reconnects >= 10
        assert report.ok, report.to_dict()
        assert report.acked == 3000
        assert middle.wait_for(lambda m: acked_pairs(report) <= m.messages(), 20)
    finally:
        middle.close()
