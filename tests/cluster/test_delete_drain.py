"""Deleting a pipeline (deletionPolicy Drain, the default) while devices send."""

from __future__ import annotations

from support.cluster import LocalCluster, scenario
from support.cluster.api import PIPELINES
from support.cluster.cluster import PVCS, STS
from support.cluster.scenario import NAME

pytestmark = scenario.marks()


async def test_delete_with_drain_stores_every_ack_before_children_go(
        cluster: LocalCluster) -> None:
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(replicas=2))
    ingest = f"{NAME}-ingest"
    reasons: list[str] = []

    def gone() -> bool:
        condition = cluster.condition(NAME, "Deleting")
        if condition and (not reasons or reasons[-1] != condition["reason"]):
            reasons.append(condition["reason"])
        return cluster.api.get(PIPELINES, NAME) is None

    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks before the deletion")
        await cluster.api.delete(PIPELINES, NAME)
        # The finalizer holds the pipeline (and so every child) while ingest drains away.
        await cluster.wait(gone, 90, "the pipeline released after the drain")
        # Nothing is left to connect to: leaving the block stops the devices; messages
        # they still hold were never acknowledged, so nothing is owed for them.
    assert cluster.replicas_seen[ingest] == [2, 1, 0]
    assert cluster.max_removing[ingest] == 1
    assert "DrainingIngest" in reasons, reasons
    # Released only once every queue was drained (drained PVCs are deleted) ...
    assert not {n for n in cluster.api.names(PVCS) if n.startswith(f"queue-{ingest}-")}
    # ... and then the garbage collector takes the children.
    await cluster.wait(lambda: not cluster.api.names(STS) and not cluster.pod_names(NAME),
                       60, "children garbage-collected")
    await scenario.assert_every_ack_stored_once(cluster, fleet, within=5)
