"""Lowering ``spec.ingest.processes`` while devices send: a rolling restart whose new pods
forward the retired per-process queues (contract 3)."""

from __future__ import annotations

from support.cluster import LocalCluster, scenario
from support.cluster.cluster import STS
from support.cluster.scenario import NAME

pytestmark = scenario.marks()


async def test_processes_four_to_two(cluster: LocalCluster) -> None:
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(replicas=2, processes=4))
    ingest = f"{NAME}-ingest"
    queues = [cluster.pvc_dir(f"queue-{ingest}-{i}") for i in (0, 1)]
    assert all({p.name for p in q.iterdir()} >= {"p0", "p1", "p2", "p3"} for q in queues)
    async with scenario.devices(cluster, count=16) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 400, 30, "acks before the change")
        await cluster.patch_pipeline(NAME, {"ingest": {"processes": 2}})

        def rolled() -> bool:
            pods = [cluster.kubelet.containers.get(f"{ingest}-{i}") for i in (0, 1)]
            return (all(c is not None and c.env.get("IOTPIPE_INGEST_PROCESSES") == "2"
                        for c in pods)
                    and cluster.ready_pods(f"{ingest}-") == [f"{ingest}-0", f"{ingest}-1"])

        await cluster.wait(rolled, 60, "both ingest pods rolled to 2 processes")
        # The retired queues p2, p3 are forwarded by the new pods and then removed.
        await cluster.wait(lambda: all({p.name for p in q.iterdir() if p.name.startswith("p")}
                                       == {"p0", "p1"} for q in queues), 60,
                           "retired queues drained and removed")
        after = fleet.total_acked()
        await cluster.wait(lambda: fleet.total_acked() >= after + 200, 30,
                           "devices carry on")
        await running.finish()
    sts = cluster.api.get(STS, ingest) or {}
    assert sts["spec"]["replicas"] == 2, "lowering processes is not a scale-down"
    assert cluster.max_terminating[ingest] == 1, "a rolling restart, one pod at a time"
    await scenario.assert_every_ack_stored_once(cluster, fleet)
    assert fleet.errors == {}, fleet.errors
