"""Autoscaling day-2 operations while devices send: switching the autoscaler off steps
down through the drain; a discovery failure never scales ingest down.

The test plays the autoscaler itself (HPA or KEDA write the StatefulSet's replicas; the
stand-in runs no metrics pipeline to drive them)."""

from __future__ import annotations

import asyncio
import contextlib

from support.cluster import ClusterEmulator, LocalCluster, scenario
from support.cluster.cluster import HPAS, SCALEDOBJECTS, STS
from support.cluster.scenario import NAME

pytestmark = scenario.marks()

INGEST = f"{NAME}-ingest"


async def _autoscaler_scales_to(cluster: LocalCluster, replicas: int) -> None:
    """Write replicas as an HPA does: again at each of its syncs while they differ.

    A real HPA re-asserts its count every sync period (15 s by default). Written once, an
    operator pass that read the StatefulSet just before this write and applied just after
    it (still owning replicas during the hand-over) would undo it for good.
    """
    async def sync() -> None:
        while True:
            sts = cluster.api.get(STS, INGEST) or {}
            if (sts.get("spec") or {}).get("replicas") != replicas:
                await cluster.api.patch(STS, INGEST, {"spec": {"replicas": replicas}})
            await asyncio.sleep(1.0)

    syncing = asyncio.create_task(sync())
    try:
        await cluster.wait(lambda: len(cluster.ready_pods(f"{INGEST}-")) == replicas, 60,
                           f"{replicas} ingest pods ready")
    finally:
        syncing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await syncing


async def test_hpa_to_none_from_six_steps_down_through_the_drain(
        cluster: LocalCluster) -> None:
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(
        replicas=2, autoscaling={"mode": "hpa", "minReplicas": 2, "maxReplicas": 6}))
    await cluster.wait(lambda: cluster.api.get(HPAS, INGEST), 30, "the HPA")
    await _autoscaler_scales_to(cluster, 6)
    async with scenario.devices(cluster, count=18) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks before the switch")
        await cluster.patch_pipeline(NAME, {"ingest": {"replicas": 2,
                                                       "autoscaling": {"mode": "none"}}})
        await cluster.wait(lambda: cluster.api.get(HPAS, INGEST) is None, 30, "HPA removed")
        await cluster.wait(lambda: cluster.pod_names(f"{INGEST}-")
                           == [f"{INGEST}-0", f"{INGEST}-1"], 90, "stepped down to 2")
        after = fleet.total_acked()
        await cluster.wait(lambda: fleet.total_acked() >= after + 200, 30, "devices carry on")
        await running.finish()
    seen = cluster.replicas_seen[INGEST]
    assert seen[seen.index(6):] == [6, 5, 4, 3, 2], seen
    assert cluster.max_removing[INGEST] == 1
    await scenario.assert_every_ack_stored_once(cluster, fleet)
    assert fleet.errors == {}, fleet.errors


async def test_keda_discovery_503_never_scales_down(kmock: ClusterEmulator,
                                                    cluster: LocalCluster) -> None:
    cluster.install_keda()
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(
        replicas=2, autoscaling={"mode": "keda", "minReplicas": 2, "maxReplicas": 8}))
    await cluster.wait(lambda: cluster.api.get(SCALEDOBJECTS, INGEST), 30, "the ScaledObject")
    await _autoscaler_scales_to(cluster, 4)
    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks before the outage")
        # KEDA's aggregated API fails: discovery of keda.sh answers 503.
        kmock.unavailable.add("/apis/keda.sh/v1alpha1")
        hits = kmock.unavailable_hits
        await cluster.wait(lambda: kmock.unavailable_hits >= hits + 6, 30,
                           "several reconcile passes during the outage")
        assert (cluster.api.get(STS, INGEST) or {})["spec"]["replicas"] == 4
        assert cluster.api.get(SCALEDOBJECTS, INGEST) is not None
        kmock.unavailable.clear()
        after = fleet.total_acked()
        await cluster.wait(lambda: fleet.total_acked() >= after + 200, 30, "devices carry on")
        await running.finish()
    assert cluster.replicas_seen[INGEST][-1] == 4
    assert cluster.pod_names(f"{INGEST}-") == [f"{INGEST}-{i}" for i in range(4)]
    assert cluster.max_terminating.get(INGEST, 0) == 0, "no ingest pod was removed"
    await scenario.assert_every_ack_stored_once(cluster, fleet)
    assert fleet.errors == {}, fleet.errors


async def test_none_to_hpa_hands_replicas_over_without_a_scale_down(
        cluster: LocalCluster) -> None:
    # The operator's apply owned spec.replicas; an apply that simply dropped it would let
    # server-side apply remove the field and the StatefulSet fall back to 1 replica (three
    # parallel drains) before the HPA first wrote it.
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(replicas=4))
    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks")
        await cluster.patch_pipeline(NAME, {"ingest": {"autoscaling": {
            "mode": "hpa", "minReplicas": 2, "maxReplicas": 6}}})
        await cluster.wait(lambda: cluster.api.get(HPAS, INGEST), 30, "the HPA")
        passes = cluster.passes
        await cluster.wait(lambda: cluster.passes >= passes + 25, 30, "controller passes")
        # The HPA then scales within its bounds, and the operator leaves its value alone.
        await _autoscaler_scales_to(cluster, 5)
        after = fleet.total_acked()
        await cluster.wait(lambda: fleet.total_acked() >= after + 200, 30, "devices carry on")
        await running.finish()
    assert min(cluster.replicas_seen[INGEST]) == 4, cluster.replicas_seen[INGEST]
    sts = cluster.api.get(STS, INGEST)
    assert sts is not None and sts["spec"]["replicas"] == 5
    await scenario.assert_every_ack_stored_once(cluster, fleet)
