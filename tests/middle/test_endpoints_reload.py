"""A middle tier that grows and shrinks while the other tiers run: ingest, relay and
storage follow their endpoints files (as mounted from the operator's ConfigMap) to a second
middle and away from the first without restarting, and every acknowledged message is
stored once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest
from support.ports import free_port
from support.processes import ProcessGroup
from support.waiting import exited, wait_for, wait_ready
from websockets.asyncio.client import ClientConnection, connect

from iotpipe.ingest.core import preferred_endpoint
from iotpipe.ingest.identity import INCARNATION_FILE
from iotpipe_tools.simulate import SimulateSettings, SimulationReport, run_simulation

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SECRET = "endpoints-reload-test-secret-at-least-32-bytes"
ENV = {"IOTPIPE_AUTH_SECRET": SECRET}
RELOAD = ("--endpoints-reload-seconds", "0.2")


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except OSError:
        return 0, ""


def metric(port: int, name: str, labels: str = "") -> float:
    """A sample's value (-1 when absent); ``labels`` is the exact label text if any."""
    text = http_get(port, "/metrics")[1]
    wanted = re.escape(name + (f"{{{labels}}}" if labels else ""))
    match = re.search(rf"^{wanted} ([0-9.e+-]+)$", text, re.M)
    return float(match.group(1)) if match else -1.0


def write_atomically(path: Path, text: str) -> None:
    """As kubelet updates a mounted ConfigMap: the new content appears all at once."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MiddlePorts:
    def __init__(self, name: str) -> None:
        self.name = name
        self.router, self.pub, self.feed, self.metrics = (free_port() for _ in range(4))

    def endpoint(self, kind: str) -> str:
        return f"tcp://127.0.0.1:{getattr(self, kind)}"


def start_middle(procs: ProcessGroup, tmp_path: Path, m: MiddlePorts) -> subprocess.Popen[bytes]:
    proc = procs.iotpipe(
        "middle", "--host", "127.0.0.1", "--router-port", str(m.router), "--pub-port",
        str(m.pub), "--feed-port", str(m.feed), "--metrics-port", str(m.metrics),
        "--data-dir", str(tmp_path / m.name), "--middle-id", m.name, name=m.name)
    wait_ready(f"http://127.0.0.1:{m.metrics}/readyz", 20, what=f"{m.name} ready",
               abort=exited(proc, m.name), details=lambda: procs.log(m.name))
    return proc


def write_endpoints(directory: Path, middles: list[MiddlePorts]) -> None:
    for kind, key in (("router", "router"), ("pub", "pub"), ("feed", "feed")):
        write_atomically(directory / key, "".join(f"{m.endpoint(kind)}\n" for m in middles))


def acked_pairs(report: SimulationReport) -> set[tuple[str, str]]:
    return {(d, str(i)) for d, ids in report.acked_ids.items() for i in ids}


def stored_pairs(db_path: Path) -> list[tuple[str, str]]:
    if not db_path.exists():
        return []
    db = sqlite3.connect(db_path)
    try:
        return db.execute("SELECT device_id, msg_id FROM readings").fetchall()
    except sqlite3.OperationalError:  # the table is not created yet
        return []
    finally:
        db.close()


async def test_a_second_middle_is_used_without_restarting_any_tier(
        procs: ProcessGroup, tmp_path: Path) -> None:
    a, b = MiddlePorts("middle-a"), MiddlePorts("middle-b")
    start_middle(procs, tmp_path, a)
    start_middle(procs, tmp_path, b)
    endpoints = tmp_path / "endpoints"
    endpoints.mkdir()
    write_endpoints(endpoints, [a])
    # Give the ingest queue an incarnation under which its node prefers B once B is listed
    # (rendezvous hashing), so the test knows the traffic must move there.
    queue_dir = tmp_path / "queue" / "p0"
    queue_dir.mkdir(parents=True)
    incarnation = next(f"{i:016x}" for i in range(1000) if preferred_endpoint(
        f"node-p0~{i:016x}", [a.endpoint("router"), b.endpoint("router")]) == 1)
    (queue_dir / INCARNATION_FILE).write_text(incarnation + "\n")

    ingest_port, ingest_metrics = free_port(), free_port()
    ingest = procs.iotpipe(
        "ingest", "--host", "127.0.0.1", "--port", str(ingest_port), "--metrics-port",
        str(ingest_metrics), "--data-dir", str(tmp_path / "queue"), "--node-id", "node",
        "--middle-endpoints-file", str(endpoints / "router"), "--rate-limit", "0", *RELOAD,
        name="ingest", env=ENV)
    relay_port, relay_metrics = free_port(), free_port()
    relay = procs.iotpipe(
        "relay", "--host", "127.0.0.1", "--port", str(relay_port), "--metrics-port",
        str(relay_metrics), "--middle-pub-endpoints-file", str(endpoints / "pub"),
        "--insecure-no-auth", "--registry-file", str(tmp_path / "none.yaml"), *RELOAD,
        name="relay")
    db_path = tmp_path / "store" / "readings.db"
    storage_metrics = free_port()
    storage = procs.iotpipe(
        "storage", "--host", "127.0.0.1", "--metrics-port", str(storage_metrics),
        "--feed-endpoints-file", str(endpoints / "feed"), "--consumer-id", "storage-0",
        "--sinks", f"sqlite://{db_path}", "--registry-file", str(tmp_path / "none.yaml"),
        "--heartbeat", "0.2", *RELOAD, name="storage")
    for name, port in (("ingest", ingest_metrics), ("relay", relay_metrics),
                       ("storage", storage_metrics)):
        wait_for(lambda port=port: http_get(port, "/readyz")[0] == 200, 30,  # type: ignore[misc]
                   f"{name} ready: {procs.log(name)[-2000:]}")

    sources: dict[str, int] = {}

    async def watch(ws: ClientConnection) -> None:
        async for message in ws:
            frame = orjson.loads(message)
            if "source" in frame and "device" in frame:
                sources[str(frame["source"])] = sources.get(str(frame["source"]), 0) + 1

    def settings(first_device: int) -> SimulateSettings:
        return SimulateSettings(url=f"ws://127.0.0.1:{ingest_port}/v1/ingest", secret=SECRET,
                                connections=10, messages=20, batch=2, first_device=first_device,
                                spread_sources=False, ack_timeout=20.0)

    async with connect(f"ws://127.0.0.1:{relay_port}/v1/live") as ws:
        await ws.send(orjson.dumps({"op": "subscribe", "prefixes": ["sim-"]}).decode())
        assert orjson.loads(await asyncio.wait_for(ws.recv(), 10))["event"] == "subscribed"
        watcher = asyncio.create_task(watch(ws))
        try:
            first = await run_simulation(settings(0))
            assert first.ok and first.acked == 200, first.to_dict()
            await asyncio.to_thread(wait_for, lambda: len(stored_pairs(db_path)) == 200,
                                    30, "first round stored")
            assert metric(b.metrics, "iotpipe_middle_batches_total") == 0

            # The middle tier grows: only the files change.
            write_endpoints(endpoints, [a, b])
            await asyncio.to_thread(
                wait_for, lambda: metric(relay_metrics, "iotpipe_relay_upstreams_connected")
                == 2 and metric(storage_metrics, "iotpipe_endpoints", 'key="feed"') == 2
                and metric(ingest_metrics, "iotpipe_endpoints", 'key="router"') == 2,
                20, "every tier took the new endpoints")
            second = await run_simulation(settings(100))
            assert second.ok and second.acked == 200, second.to_dict()
            expected = acked_pairs(first) | acked_pairs(second)
            await asyncio.to_thread(wait_for, lambda: len(stored_pairs(db_path)) == 400,
                                    30, "second round stored")
            # B's router took the batches, B's PUB reached the relay, B's feed storage.
            assert metric(b.metrics, "iotpipe_middle_records_total") >= 200
            feed_b = f'endpoint="{b.endpoint("feed")}"'
            assert metric(storage_metrics, "iotpipe_storage_records_received_total",
                          feed_b) >= 200
            await asyncio.to_thread(wait_for, lambda: sources.get("middle-b", 0) > 0, 10,
                                    f"relay events from middle-b: {sources}")
            assert sources.get("middle-a", 0) > 0

            # And shrinks again (A drained first, as the operator does): A is let go.
            write_endpoints(endpoints, [b])
            await asyncio.to_thread(
                wait_for, lambda: metric(relay_metrics, "iotpipe_relay_upstreams_connected")
                == 1 and metric(storage_metrics, "iotpipe_endpoints", 'key="feed"') == 1
                and metric(ingest_metrics, "iotpipe_endpoints", 'key="router"') == 1,
                20, "every tier let middle-a go")
            a_records = metric(a.metrics, "iotpipe_middle_records_total")
            third = await run_simulation(settings(200))
            assert third.ok and third.acked == 200, third.to_dict()
            expected |= acked_pairs(third)
            await asyncio.to_thread(wait_for, lambda: len(stored_pairs(db_path)) == 600,
                                    30, "third round stored")
            assert metric(a.metrics, "iotpipe_middle_records_total") == a_records
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    stored = stored_pairs(db_path)
    assert len(stored) == len(set(stored)) == 600 and set(stored) == expected
    # A broken file is reported and the last good list kept: no tier crashes or lets go.
    for key in ("router", "pub", "feed"):
        write_atomically(endpoints / key, "middle-b:5555\n")
    for port, key in ((ingest_metrics, "router"), (relay_metrics, "pub"),
                      (storage_metrics, "feed")):
        wait_for(lambda port=port, key=key: metric(  # type: ignore[misc]
            port, "iotpipe_endpoints_file_failing", f'key="{key}"') == 1, 20, f"{key} failing")
        assert metric(port, "iotpipe_endpoints", f'key="{key}"') == 1
        assert http_get(port, "/readyz")[0] == 200
    # Nobody restarted: the same processes serve throughout.
    assert ingest.poll() is None and relay.poll() is None and storage.poll() is None
    assert metric(ingest_metrics, "iotpipe_endpoints_reloads_total", 'key="router"') == 2
