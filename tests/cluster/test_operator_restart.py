"""The operator SIGKILLed in the middle of a step-down drain, then started again."""

from __future__ import annotations

import signal

from support.cluster import LocalCluster, scenario
from support.cluster.api import PIPELINES
from support.cluster.cluster import JOBS, PVCS
from support.cluster.scenario import NAME

pytestmark = scenario.marks()


async def test_operator_killed_mid_drain_resumes_it(cluster: LocalCluster) -> None:
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(replicas=3))
    ingest = f"{NAME}-ingest"
    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks before the scale-down")
        await cluster.patch_pipeline(NAME, {"ingest": {"replicas": 1}})
        # The first step is under way: ordinal 2 is leaving.
        await cluster.wait(lambda: cluster.replicas_seen[ingest][-1] == 2, 30, "first step")
        assert cluster.stop_operator(signal.SIGKILL) == -signal.SIGKILL
        # With no operator, the cluster goes on: the pod drains itself and goes.
        await cluster.wait(lambda: f"{ingest}-2" not in cluster.pod_names(ingest), 60,
                           "ordinal 2's pod gone while the operator is down")
        assert cluster.replicas_seen[ingest][-1] == 2, "nothing steps on without the operator"
        cluster.start_operator()
        await cluster.wait(lambda: cluster.pod_names(f"{ingest}-") == [f"{ingest}-0"], 60,
                           "the restarted operator finishes the step-down")
        await cluster.wait(lambda: not cluster.api.names(JOBS) and not cluster.api.names(PVCS)
                           & {f"queue-{ingest}-1", f"queue-{ingest}-2"}, 60,
                           "drained queues released")
        after = fleet.total_acked()
        await cluster.wait(lambda: fleet.total_acked() >= after + 200, 30,
                           "devices carry on through the pod left")
        await running.finish()
    assert cluster.replicas_seen[ingest] == [3, 2, 1]
    assert cluster.max_removing[ingest] == 1
    await scenario.assert_every_ack_stored_once(cluster, fleet)
    assert fleet.errors == {}, fleet.errors


async def test_operator_killed_mid_drain_deletion_resumes_it(cluster: LocalCluster) -> None:
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(replicas=2))
    ingest = f"{NAME}-ingest"
    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 300, 30, "acks before the deletion")
        await cluster.api.delete(PIPELINES, NAME)
        await cluster.wait(lambda: cluster.replicas_seen[ingest][-1] == 1, 30,
                           "the deletion's first step")
        assert cluster.stop_operator(signal.SIGKILL) == -signal.SIGKILL
        await cluster.wait(lambda: f"{ingest}-1" not in cluster.pod_names(ingest), 60,
                           "ordinal 1's pod gone while the operator is down")
        # The finalizer holds the pipeline, and so every child, while nobody drives it.
        assert cluster.api.get(PIPELINES, NAME) is not None
        assert cluster.replicas_seen[ingest][-1] == 1
        cluster.start_operator()
        await cluster.wait(lambda: cluster.api.get(PIPELINES, NAME) is None, 90,
                           "the restarted operator finishes the Drain deletion")
    assert cluster.replicas_seen[ingest] == [2, 1, 0]
    assert cluster.max_removing[ingest] == 1
    assert not {n for n in cluster.api.names(PVCS) if n.startswith(f"queue-{ingest}-")}
    await cluster.wait(lambda: not cluster.pod_names(NAME), 60, "children garbage-collected")
    await scenario.assert_every_ack_stored_once(cluster, fleet, within=5)
