"""Scaling the middle tier 2 -> 3 while devices send: no other tier restarts (contract 1)."""

from __future__ import annotations

import asyncio
import contextlib

from support.cluster import LocalCluster, scenario
from support.cluster.scenario import NAME
from support.devices import LiveClient, check_live_stream
from support.pipeline import SECRET

from iotpipe.auth import CLIENT_AUDIENCE, issue_token

pytestmark = scenario.marks()


def _others(cluster: LocalCluster) -> dict[str, tuple[int, int]]:
    """Every ingest, relay and storage pod: (pid, restarts)."""
    out = {}
    for name, container in cluster.kubelet.containers.items():
        if any(name.startswith(f"{NAME}-{t}-") for t in ("ingest", "relay", "storage")) \
                and container.proc is not None and "drain" not in name:
            out[name] = (container.proc.pid, container.restarts)
    return out


async def test_middle_two_to_three_restarts_nothing(cluster: LocalCluster) -> None:
    manifest = scenario.pipeline_manifest(replicas=2)
    manifest["spec"]["middle"]["replicas"] = 2
    await scenario.start_pipeline(cluster, manifest)
    before = _others(cluster)
    assert len(before) == 4, before  # 2 ingest, 1 relay, 1 storage
    created = len(cluster.pods_created)
    live = LiveClient(cluster.url(f"{NAME}-relay", 8081, "/v1/live"),
                      issue_token(SECRET.encode(), "watcher", CLIENT_AUDIENCE, 3600),
                      {"prefixes": ["dev-"]})
    stop_live = asyncio.Event()
    watcher = asyncio.create_task(live.run(stop_live))
    try:
        async with scenario.devices(cluster) as running:
            fleet = running.fleet
            await cluster.wait(lambda: live.subscribed.is_set(), 30, "a live client subscribed")
            await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks before the change")
            await cluster.wait(lambda: live.readings(), 30, "live readings before the change")
            await cluster.patch_pipeline(NAME, {"middle": {"replicas": 3}})
            await cluster.wait(lambda: len(cluster.ready_pods(f"{NAME}-middle-")) == 3, 60,
                               "a third middle pod ready")
            # Each tier picks the new endpoint list up from its mounted endpoints file.
            for pod, message in [(f"{NAME}-ingest-0", "middle endpoints changed"),
                                 (f"{NAME}-ingest-1", "middle endpoints changed"),
                                 (f"{NAME}-storage-0", "feed endpoints changed")]:
                await cluster.wait(lambda p=pod, m=message: m in cluster.pod_log(p)
                                   and f"{NAME}-middle-2" in cluster.pod_log(p), 30,
                                   f"{pod}: {message}")
            relay = next(n for n in before if n.startswith(f"{NAME}-relay-"))
            await cluster.wait(lambda: "middle PUB endpoints changed" in cluster.pod_log(relay),
                               30, "relay: endpoints changed")
            after = fleet.total_acked()
            seen = len(live.readings())
            await cluster.wait(lambda: fleet.total_acked() >= after + 300, 30, "devices carry on")
            await cluster.wait(lambda: len(live.readings()) >= seen + 300, 30,
                               "live readings after the change")
            await running.finish()
    finally:
        stop_live.set()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(watcher, timeout=10)
    assert len(live.connections) == 1, "the live client never had to reconnect"
    check_live_stream(live.connections)
    assert _others(cluster) == before, "no ingest, relay or storage pod restarted"
    assert cluster.pods_created[created:] == [f"{NAME}-middle-2"], "only the new middle pod"
    assert cluster.max_terminating.get(f"{NAME}-ingest", 0) == 0
    await scenario.assert_every_ack_stored_once(cluster, fleet)
    assert fleet.errors == {}, fleet.errors
