"""An ingest pod with several processes, as Kubernetes sees it: one health and metrics
endpoint for all of them, children that die with the parent, and queues of processes it
no longer runs drained to the middle tier."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
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
from support.waiting import http_status, wait_for
from websockets.asyncio.client import ClientConnection, connect

from iotpipe.auth import DEVICE_AUDIENCE, issue_token
from iotpipe.queue import PersistentQueue
from iotpipe_tools.simulate import run_simulation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

ENV = {"IOTPIPE_AUTH_SECRET": SECRET}


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(port: int, name: str) -> float:
    return metrics(port).get((name, ()), -1.0)


def child_metrics_ports(procs: ProcessGroup, name: str) -> list[int]:
    """The private metrics ports the children logged (they share the parent's stderr)."""
    ports = []
    for line in procs.log(name).splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if entry.get("msg") == "ingest listening":
                ports.append(int(entry["metrics_port"]))
    return ports


def start_pod(procs: ProcessGroup, data_dir: Path, name: str, processes: int,
              *endpoints: str) -> tuple[subprocess.Popen[bytes], int, int]:
    port, metrics_port = free_port(), free_port()
    proc = procs.iotpipe(
        "ingest", "--host", "127.0.0.1", "--port", str(port), "--metrics-port",
        str(metrics_port), "--data-dir", str(data_dir), "--node-id", "node",
        "--processes", str(processes), "--rate-limit", "0", *endpoints, name=name, env=ENV)
    try:
        wait_ready(metrics_port, 30)
    except TimeoutError:
        raise AssertionError(procs.log(name)) from None
    return proc, port, metrics_port


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def port_free(port: int) -> bool:
    """Nothing listens on ``port``: a new server can bind it (with SO_REUSEADDR, as servers
    do, so connections of the dead one in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_one_endpoint_covers_every_process(procs: ProcessGroup, tmp_path: Path) -> None:
    middle = FakeMiddle()
    clients: list[ClientConnection] = []
    try:
        parent, port, metrics_port = start_pod(procs, tmp_path / "q", "pod", 2,
                                               "--middle-endpoints", middle.endpoint)
        wait_for(lambda: len(child_metrics_ports(procs, "pod")) == 2, 20, "children logged")
        private = child_metrics_ports(procs, "pod")
        assert metrics_port not in private
        secret = SECRET.encode()
        for i in range(30):
            token = issue_token(secret, f"dev-{i}", DEVICE_AUDIENCE, 600)
            ws = await connect(f"ws://127.0.0.1:{port}/v1/ingest",
                               additional_headers={"Authorization": f"Bearer {token}"})
            clients.append(ws)
            await ws.send(orjson.dumps({"id": i, "data": {"k": i}}).decode())
            assert orjson.loads(await ws.recv())["type"] == "ack"
        # The pod's gauges and counters are the sums over its processes...
        per_child = [metric(p, "iotpipe_ingest_connections") for p in private]
        assert sum(per_child) == 30 and all(n > 0 for n in per_child), per_child
        pod = metrics(metrics_port)
        assert pod[("iotpipe_ingest_connections", ())] == 30
        assert pod[("iotpipe_ingest_messages_accepted_total", ())] == 30
        assert pod[("iotpipe_ingest_processes_scraped", ())] == 2
        # ...and its readiness fails when any one process is unhealthy: stopped (not
        # answering its probe), then killed (until restarted and ready again).
        first, second = children_of(parent.pid)
        os.kill(first, signal.SIGSTOP)
        try:
            wait_for(lambda: http_status(f"http://127.0.0.1:{metrics_port}/readyz") == 503,
                       20, "pod unready while a child is stopped")
        finally:
            os.kill(first, signal.SIGCONT)
        wait_ready(metrics_port, 20)
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: http_status(f"http://127.0.0.1:{metrics_port}/readyz") == 503,
                   20, "pod unready while a child is dead")
        wait_ready(metrics_port, 30)
        assert second not in children_of(parent.pid) and len(children_of(parent.pid)) == 2
        assert metric(metrics_port, "iotpipe_ingest_process_restarts_total") == 1
        parent.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(parent.wait, 60) == 0, procs.log("pod")
    finally:
        for ws in clients:
            with contextlib.suppress(Exception):
                await ws.close()
        middle.close()


def test_sigkilled_parent_takes_its_children_along(procs: ProcessGroup,
                                                   tmp_path: Path) -> None:
    middle = FakeMiddle()
    try:
        data_dir = tmp_path / "q"
        parent, port, metrics_port = start_pod(procs, data_dir, "pod", 2,
                                               "--middle-endpoints", middle.endpoint)
        children = children_of(parent.pid)
        assert len(children) == 2
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in children), 20,
                   "children gone after the parent was SIGKILLed")
        try:
            wait_for(lambda: port_free(port) and port_free(metrics_port), 10, "ports free")
        except AssertionError:
            raise AssertionError(subprocess.run(["ss", "-tanp"], capture_output=True,
                                                text=True).stdout) from None
        for i in (0, 1):  # the queue locks are free: a new pod can open them
            with PersistentQueue.open(data_dir / f"p{i}", capacity_bytes=1 << 30,
                                      consumers=("forwarder",)):
                pass
    finally:
        middle.close()


async def test_lowered_processes_drain_the_retired_queues(procs: ProcessGroup,
                                                          tmp_path: Path) -> None:
    silent, acking = FakeMiddle(mode="silent"), FakeMiddle()
    data_dir, router = tmp_path / "q", tmp_path / "endpoints" / "router"
    router.parent.mkdir()
    router.write_text(f"# the middle tier\n{silent.endpoint}\n")
    reload = ("--middle-endpoints-file", str(router), "--endpoints-reload-seconds", "0.2",
              "--drain-timeout", "1")
    try:
        # Two processes store and acknowledge; nothing reaches a middle.
        first, port, _ = start_pod(procs, data_dir, "first", 2, *reload)
        report = await run_simulation(simulate(port, connections=40, messages=10, batch=2,
                                               spread_sources=False))
        assert report.ok and report.acked == 400, report.to_dict()
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 60) == 1  # drain timed out: queues kept
        depths = [queue_depth(data_dir / f"p{i}") for i in (0, 1)]
        assert sum(depths) == 400 and all(depths), depths
        identities = {node_identity(data_dir / f"p{i}", f"node-p{i}") for i in (0, 1)}

        # One process now: p1 is retired, drained (still to the silent middle) and shown.
        second, _, metrics_port = start_pod(procs, data_dir, "second", 1, *reload)
        wait_for(lambda: metric(metrics_port, "iotpipe_ingest_retired_queues") == 1, 10,
                   "the retired queue shown")
        assert metric(metrics_port, "iotpipe_ingest_retired_queue_records") == depths[1]
        retired_depth = ("iotpipe_queue_depth_records",
                         (("queue", "retired"), ("tier", "ingest")))
        assert metrics(metrics_port)[retired_depth] == depths[1]
        assert (data_dir / "p1").is_dir()
        # The middle tier changes (endpoints file rewritten): same process, no restart.
        router.write_text(f"{acking.endpoint}\n")
        expected = acked_pairs(report)
        assert acking.wait_for(lambda m: expected <= m.messages(), 30), \
            len(expected - acking.messages())
        # Under the queues' own identities, each acked message under exactly one (node, seq).
        assert acking.nodes == identities
        assert len(acking.stored) == 400
        # Renamed first, then deleted: wait for both.
        wait_for(lambda: sorted(p.name for p in data_dir.iterdir()) == ["p0"], 20,
                   "p1 removed once empty")
        pod = metrics(metrics_port)
        assert pod[("iotpipe_ingest_retired_queues", ())] == 0
        assert pod[retired_depth] == 0
        assert pod[("iotpipe_ingest_retired_queues_removed_total", ())] == 1
        assert pod[("iotpipe_endpoints_reloads_total", (("key", "router"),))] == 1
        assert second.poll() is None
        second.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(second.wait, 60) == 0, procs.log("second")
        assert queue_depth(data_dir / "p0") == 0
    finally:
        silent.close()
        acking.close()


async def test_drain_command_follows_the_endpoints_file(procs: ProcessGroup,
                                                        tmp_path: Path) -> None:
    silent, acking = FakeMiddle(mode="silent"), FakeMiddle()
    data_dir, router = tmp_path / "q", tmp_path / "router"
    router.write_text(f"{silent.endpoint}\n")
    try:
        pod, port, _ = start_pod(procs, data_dir, "pod", 1, "--middle-endpoints",
                                 silent.endpoint)
        report = await run_simulation(simulate(port, connections=5, messages=40, batch=4))
        assert report.ok and report.acked == 200
        os.kill(pod.pid, signal.SIGKILL)
        pod.wait(10)
        drain = procs.iotpipe("drain", "--data-dir", str(data_dir), "--node-id", "node",
                              "--middle-endpoints-file", str(router),
                              "--endpoints-reload-seconds", "0.2", "--timeout", "60",
                              name="drain")
        assert silent.wait_for(lambda m: bool(m.batches), 20), procs.log("drain")
        router.write_text(f"# moved\n{acking.endpoint}\n")
        assert await asyncio.to_thread(drain.wait, 60) == 0, procs.log("drain")
        assert acked_pairs(report) <= acking.messages()
        assert acking.nodes == {node_identity(data_dir / "p0", "node-p0")}
        assert queue_depth(data_dir / "p0") == 0
    finally:
        silent.close()
        acking.close()
