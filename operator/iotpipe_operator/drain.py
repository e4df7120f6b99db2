"""Scale-down never strands data: draining the retained queues of removed ingest pods.

Design
------
Every ingest pod owns a persistent queue on its PVC (``queue-NAME-ingest-<ordinal>``,
from the StatefulSet's volumeClaimTemplate). Messages in it are already acknowledged to
devices, so the queue must reach the middle tier even when its pod goes away for good.

1. **Normal termination drains in the pod.** A removed pod gets SIGTERM after its preStop
   delay; ingest stops accepting, closes devices with 1001 at a bounded rate, forwards
   everything queued and exits 0 with an empty queue. ``terminationGracePeriodSeconds``
   covers preStop + ``drain.graceSeconds`` + a margin.
2. **The operator catches what the pod could not finish** (grace period exceeded, a node
   lost, a SIGKILL): the StatefulSet keeps the PVC on scale-down
   (``persistentVolumeClaimRetentionPolicy.whenScaled: Retain``), and on every reconcile
   (timer, create/update/resume) :func:`plan` looks at each retained ingest PVC:

   - ordinal ``k >= replicas`` (the live StatefulSet's ``spec.replicas``, i.e. whatever the
     spec or the HPA/KEDA set) and pod ``NAME-ingest-k`` gone: create the drain Job
     ``NAME-ingest-drain-k`` (deterministic name, so creating it twice is a 409, not a
     second Job). It mounts the PVC and runs ``iotpipe drain --data-dir ... --node-id
     NAME-ingest-k --middle-endpoints ...``: the same node id as the pod, so the middle
     tier's per-node deduplication drops anything the pod had already delivered.
   - the Job succeeded: delete the PVC (the queue is empty), then the Job.
   - the Job failed (backoffLimit exhausted): keep both and report Degraded/DrainFailed;
     a human decides (``kubectl logs job/...``; delete the Job to retry).
   - the pod still exists (terminating and draining itself): wait.

   The same runs whether the PVC was drained in the pod or not: draining an empty queue is
   a no-op, so the rule needs no knowledge of how the pod ended.
3. **Race with a scale-up.** If replicas grow back over ``k`` while its drain Job runs,
   the StatefulSet recreates pod ``k`` on the *same* PVC. The plan then says "in service":
   a running drain Job for ``k`` is deleted (cancelled) and the returning pod forwards the
   rest of its own queue; the PVC is never deleted for an ordinal in service, and the
   decision is re-checked against a fresh read of the StatefulSet and pods right before a
   PVC is deleted. Two writers on one queue are prevented by the volume, not by timing:
   with ``queue.accessMode: ReadWriteOncePod`` (CSI) the new pod cannot mount the PVC until
   the Job's pod has exited; with ReadWriteOnce that holds across nodes, and on one node
   the queue's own lock file serialises them. A residual window remains when a scale-up
   lands between that re-check and the DELETE: the PVC (already drained, empty) then
   stays Terminating until the new pod releases it, and the StatefulSet controller
   recreates an empty one; no data is involved because the queue was empty.
4. **Middle and storage** are not drained by the operator: their PVCs are retained on
   scale-down and reattached on scale-up (the middle log keeps unconsumed records until
   every consumer group acknowledged them).
5. **Deletion of the IoTPipeline** follows ``spec.deletionPolicy``
   (:mod:`iotpipe_operator.deletion`): with Drain, ingest steps down to zero through this
   same machinery before anything is garbage-collected. The queue PVCs are *not* owned by
   the pipeline (the StatefulSet creates them, and ``whenDeleted: Retain`` keeps them), so
   with Retain recreating a pipeline with the same name reattaches them.
6. **Stepping** (:func:`next_replicas`): every scale-down removes one ordinal at a time
   from the live replicas, waiting for the previous one's pod and queue to be gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from iotpipe_operator.builders import drain_job_name
from iotpipe_operator.names import Names


@dataclass(frozen=True)
class DrainAction:
    action: str  # create_job | delete_pvc | delete_job
    ordinal: int
    name: str  # the Job or PVC name


@dataclass
class DrainPlan:
    actions: list[DrainAction] = field(default_factory=list)
    draining: list[int] = field(default_factory=list)  # Jobs running
    waiting: list[int] = field(default_factory=list)  # pod still terminating
    failed: list[int] = field(default_factory=list)  # Jobs that gave up

    def summary(self) -> dict[str, list[int]]:
        return {"draining": self.draining, "waitingForPod": self.waiting,
                "failed": self.failed}


def pvc_ordinal(pipeline_name: str, pvc_name: str) -> int | None:
    return Names(pipeline_name).pvc_ordinal("ingest", pvc_name)


def job_ordinal(pipeline_name: str, job_name: str) -> int | None:
    return Names(pipeline_name).drain_job_ordinal(job_name)


def next_replicas(target: int | None, live: int | None, pod_ordinals: set[int],
                  pvc_ordinals: set[int], step: int = 1) -> int | None:
    """The ingest replicas to apply now. Scale-down by any route (a lower
    ``ingest.replicas``, autoscaling switched off, KEDA found missing, deletion) starts from
    the live StatefulSet and removes ``step`` ordinal(s) at a time, only once every ordinal
    above the live count has finished: its pod is gone and its queue PVC drained (deleted).
    Never parallel mass drains; scale-up is immediate. ``target`` None keeps ``live``."""
    if target is None:
        return live
    if live is None or target >= live:
        return target
    if any(o >= live for o in pod_ordinals | pvc_ordinals):
        return live  # the previous step is still draining
    return max(target, live - step)


def job_state(job: dict[str, Any]) -> str:
    """succeeded | failed | running, from a Job's status."""
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete",
                                                                            "SuccessCriteriaMet"):
            return "succeeded"
        if condition.get("status") == "True" and condition.get("type") == "Failed":
            return "failed"
    if (status.get("succeeded") or 0) >= 1:
        return "succeeded"
    return "running"


def plan(pipeline_name: str, replicas: int, pvc_names: list[str], pod_names: set[str],
         jobs: list[dict[str, Any]]) -> DrainPlan:
    """What to do about retained ingest queues; pure (see the module docstring)."""
    result = DrainPlan()
    jobs_by_ordinal: dict[int, dict[str, Any]] = {}
    for job in jobs:
        ordinal = job_ordinal(pipeline_name, job["metadata"]["name"])
        if ordinal is not None:
            jobs_by_ordinal[ordinal] = job
    pvc_by_ordinal = {o: n for n in pvc_names
                      if (o := pvc_ordinal(pipeline_name, n)) is not None}

    for ordinal in sorted(set(pvc_by_ordinal) | set(jobs_by_ordinal)):
        job = jobs_by_ordinal.get(ordinal)
        job_name = drain_job_name(pipeline_name, ordinal)
        pvc = pvc_by_ordinal.get(ordinal)
        state = job_state(job) if job is not None else None
        if ordinal < replicas:
            # In service (or coming back after a scale-up): the pod owns its queue again.
            if job is not None:
                result.actions.append(DrainAction("delete_job", ordinal, job_name))
            continue
        if pvc is None:
            # Queue already gone: only a finished Job is left to tidy up.
            if state == "succeeded":
                result.actions.append(DrainAction("delete_job", ordinal, job_name))
            elif state == "failed":
                result.failed.append(ordinal)
            continue
        if f"{pipeline_name}-ingest-{ordinal}" in pod_names:
            result.waiting.append(ordinal)  # still terminating: it drains itself first
            continue
        if job is None:
            result.actions.append(DrainAction("create_job", ordinal, job_name))
            result.draining.append(ordinal)
        elif state == "succeeded":
            result.actions.append(DrainAction("delete_pvc", ordinal, pvc))
            result.actions.append(DrainAction("delete_job", ordinal, job_name))
        elif state == "failed":
            result.failed.append(ordinal)
        else:
            result.draining.append(ordinal)
    return result
