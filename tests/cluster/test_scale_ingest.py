"""Scaling ingest down while devices send: every removed pod drains, nothing is lost."""

from __future__ import annotations

from support.cluster import LocalCluster, scenario
from support.cluster.cluster import JOBS, PVCS, STS
from support.cluster.scenario import NAME

pytestmark = scenario.marks()


async def test_scale_ingest_four_to_one(cluster: LocalCluster) -> None:
    await cluster.create_pipeline(scenario.pipeline_manifest(replicas=4))
    cluster.start_operator()
    await cluster.wait(lambda: len(cluster.ready_pods(f"{NAME}-ingest-")) == 4
                       and cluster.ready_pods(f"{NAME}-storage-")
                       and cluster.ready_pods(f"{NAME}-middle-"), 60, "4 ingest pods ready")
    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks before the scale-down")
        await cluster.patch_pipeline(NAME, {"ingest": {"replicas": 1}})
        await cluster.wait(lambda: cluster.pod_names(f"{NAME}-ingest-")
                           == [f"{NAME}-ingest-0"], 60, "ingest pods 1-3 gone")
        # The removed ordinals' queues are drained and their claims released.
        await cluster.wait(lambda: cluster.api.names(PVCS) & {
            f"queue-{NAME}-ingest-{i}" for i in (1, 2, 3)} == set()
            and not cluster.api.names(JOBS), 60, "drained PVCs and Jobs removed")
        after = fleet.total_acked()
        await cluster.wait(lambda: fleet.total_acked() >= after + 200, 30,
                           "devices carry on through the one pod left")
        await running.finish()
    assert (cluster.api.get(STS, f"{NAME}-ingest") or {})["spec"]["replicas"] == 1
    # one drained ordinal at a time, from the replicas that existed
    assert cluster.replicas_seen[f"{NAME}-ingest"] == [4, 3, 2, 1]
    assert cluster.max_removing[f"{NAME}-ingest"] == 1
    stored = await scenario.assert_every_ack_stored_once(cluster, fleet)
    assert stored >= 500
    assert fleet.errors == {}, fleet.errors
