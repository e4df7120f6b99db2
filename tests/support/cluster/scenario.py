"""Scenario steps on the local cluster: a pipeline manifest, a fleet, the reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from iotpipe.auth import DEVICE_AUDIENCE, issue_token
from support.cluster import ClusterEmulator, LocalCluster
from support.devices import Fleet
from support.pipeline import SECRET

NAME = "demo"


def marks(timeout: int = 150) -> list[pytest.MarkDecorator]:
    """A scenario module's ``pytestmark``: real processes on the cluster stand-in, bounded."""
    return [pytest.mark.integration, pytest.mark.timeout(timeout),
            pytest.mark.kmock(cls=ClusterEmulator)]


def pipeline_manifest(**ingest: Any) -> dict[str, Any]:
    """A small pipeline: queues of a few MiB, short drains, one middle, relay and storage."""
    spec_ingest = {"replicas": 2, "auth": {"secretName": f"{NAME}-auth"},
                   "queue": {"size": "64Mi"},
                   "drain": {"graceSeconds": 30, "preStopSeconds": 1}, **ingest}
    return {"apiVersion": "iotpipe.dev/v1alpha1", "kind": "IoTPipeline",
            "metadata": {"name": NAME},
            "spec": {"ingest": spec_ingest,
                     "middle": {"replicas": 1, "queue": {"size": "128Mi"}},
                     "relay": {"replicas": 1},
                     "storage": {"replicas": 1, "queue": {"size": "64Mi"}}}}


@dataclass
class Devices:
    """A fleet sending through the ingest Service throughout a scenario."""

    fleet: Fleet
    task: asyncio.Task[None]
    stop: asyncio.Event

    async def finish(self, within: float = 60.0) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, timeout=within)


@contextlib.asynccontextmanager
async def devices(cluster: LocalCluster, count: int = 12, interval: float = 0.1
                  ) -> AsyncIterator[Devices]:
    """``count`` devices sending small batches to ``demo-ingest`` until finished."""
    url = cluster.url(f"{NAME}-ingest", 8080, "/v1/ingest")
    tokens = {f"dev-{i:03d}": issue_token(SECRET.encode(), f"dev-{i:03d}", DEVICE_AUDIENCE,
                                          3600) for i in range(count)}
    fleet = Fleet(url, tokens, batch=5, interval=interval, reply_timeout=20.0)
    stop = asyncio.Event()
    running = Devices(fleet, asyncio.create_task(fleet.run(stop)), stop)
    try:
        yield running
    finally:
        if not running.task.done():
            running.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await running.task


def stored_rows(cluster: LocalCluster) -> list[dict[str, Any]]:
    db = cluster.pvc_dir(f"queue-{NAME}-storage-0") / "readings.db"
    if not db.exists():
        return []
    result = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "query", "--db", str(db), "--json"],
        capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return [orjson.loads(line) for line in result.stdout.decode().splitlines() if line]


async def assert_every_ack_stored_once(cluster: LocalCluster, fleet: Fleet,
                                       within: float = 60.0) -> int:
    """Storage against every ack: 0 missing, 0 duplicates, nothing nobody sent."""
    acked = fleet.acked_pairs()
    assert acked, "the fleet got no acks at all"
    keys: Counter[tuple[str, str]] = Counter()

    def caught_up() -> bool:
        nonlocal keys
        keys = Counter((str(r["device_id"]), str(r["msg_id"])) for r in stored_rows(cluster))
        return acked <= set(keys)

    with contextlib.suppress(AssertionError):
        await cluster.wait(caught_up, within, "storage to hold every acknowledged message")
    duplicates = [k for k, n in keys.items() if n > 1]
    missing = acked - set(keys)
    assert not missing, (f"{len(missing)} of {len(acked)} acknowledged messages not stored, "
                         f"e.g. {sorted(missing)[:5]}\n{cluster.logs()}")
    assert not duplicates, f"stored more than once: {duplicates[:5]}"
    phantom = set(keys) - fleet.sent_pairs()
    assert not phantom, f"stored messages nobody sent: {sorted(phantom)[:5]}"
    # shown with -s / -rP: what the scenario moved
    print(f"reconciled: {len(acked)} acked, {sum(keys.values())} stored rows, "
          f"{fleet.reconnects} reconnects, {fleet.busy} busy replies")
    return len(acked)


async def start_pipeline(cluster: LocalCluster, manifest: dict[str, Any]) -> None:
    """Create the pipeline, run the operator, wait for every tier's pods to be ready."""
    await cluster.create_pipeline(manifest)
    cluster.start_operator()
    spec = manifest["spec"]
    wanted = {tier: spec[tier]["replicas"] for tier in ("ingest", "middle", "storage")}
    await cluster.wait(lambda: all(len(cluster.ready_pods(f"{NAME}-{tier}-")) == n
                                   for tier, n in wanted.items())
                       and cluster.ready_pods(f"{NAME}-relay-"), 60, f"ready pods {wanted}")
