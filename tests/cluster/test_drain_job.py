"""A removed ingest pod killed before it could drain: the drain Job forwards its queue.

The middle tier is frozen (SIGSTOP) so acknowledged messages pile up in the ingest
queues; ingest is scaled 2 -> 1 and the leaving pod is SIGKILLed while its drain waits for
the middle. Once the middle is back, the operator's drain Job forwards what the dead pod's
queue holds."""

from __future__ import annotations

import json
import signal

from support.cluster import LocalCluster, scenario
from support.cluster.cluster import JOBS, PVCS
from support.cluster.scenario import NAME

pytestmark = scenario.marks()

INGEST = f"{NAME}-ingest"


def _drained_records(cluster: LocalCluster, pod: str) -> int:
    total = 0
    for line in cluster.pod_log(pod).splitlines():
        if line.startswith("{") and '"draining queue"' in line:
            total += int(json.loads(line).get("records", 0))
    return total


async def test_killed_pod_queue_is_forwarded_by_the_drain_job(cluster: LocalCluster) -> None:
    await scenario.start_pipeline(cluster, scenario.pipeline_manifest(replicas=2))
    async with scenario.devices(cluster) as running:
        fleet = running.fleet
        await cluster.wait(lambda: fleet.total_acked() >= 200, 30, "acks before the freeze")
        cluster.signal_pod(f"{NAME}-middle-0", signal.SIGSTOP)
        frozen = fleet.total_acked()
        # ingest still acknowledges: every ack now waits in an ingest queue
        await cluster.wait(lambda: fleet.total_acked() >= frozen + 300, 30,
                           "acks while the middle is frozen")
        await cluster.patch_pipeline(NAME, {"ingest": {"replicas": 1}})
        await cluster.wait(lambda: (p := cluster.api.get("v1/pods", f"{INGEST}-1"))
                           and p["metadata"].get("deletionTimestamp")
                           and "draining" in cluster.pod_log(f"{INGEST}-1"), 30,
                           "ingest-1 draining towards a frozen middle")
        cluster.signal_pod(f"{INGEST}-1", signal.SIGKILL)
        await cluster.wait(lambda: f"{INGEST}-1" not in cluster.pod_names(INGEST), 30,
                           "the killed pod gone")
        assert f"queue-{INGEST}-1" in cluster.api.names(PVCS), "its queue is retained"
        cluster.signal_pod(f"{NAME}-middle-0", signal.SIGCONT)
        await cluster.wait(lambda: f"queue-{INGEST}-1" not in cluster.api.names(PVCS)
                           and not cluster.api.names(JOBS), 60,
                           "the drain Job forwarded the queue and the claim went")
        after = fleet.total_acked()
        await cluster.wait(lambda: fleet.total_acked() >= after + 200, 30, "devices carry on")
        await running.finish()
    forwarded = _drained_records(cluster, f"{INGEST}-drain-1-0")
    assert forwarded > 0, "the drain Job found the dead pod's records"
    await scenario.assert_every_ack_stored_once(cluster, fleet)
    print(f"drain Job forwarded {forwarded} records")
