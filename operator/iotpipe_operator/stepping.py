"""Stepping ingest towards the spec, the I/O half (decisions in :mod:`drain`): replicas one
drained ordinal at a time, drain Jobs for retained queues and the cleanup after them, and
the growth of queue volumes. Only reads, applies what the pure modules decide, and reports
problems; the handlers call it once per pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from iotpipe_operator import builders, drain
from iotpipe_operator.builders import Problem, selector_for, workload_name
from iotpipe_operator.kube import FIELD_MANAGER, Kube, KubeError, owned_by
from iotpipe_operator.names import Names
from iotpipe_operator.quantity import quantity_bytes

__all__ = ["drive_drains", "expand_volumes", "keep_live_replicas", "manages_replicas",
           "ordinals", "step_ingest_replicas"]


def ordinals(names: set[str] | list[str], parse: Callable[[str], int | None]) -> set[int]:
    return {o for n in names if (o := parse(n)) is not None}


def manages_replicas(obj: Mapping[str, Any]) -> bool:
    """Whether this operator's apply owns ``spec.replicas`` (managedFields)."""
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == FIELD_MANAGER and entry.get("operation") == "Apply" \
                and "f:replicas" in ((entry.get("fieldsV1") or {}).get("f:spec") or {}):
            return True
    return False


def step_ingest_replicas(kube: Kube, body: Mapping[str, Any], result: builders.BuildResult
                         ) -> str | None:
    """Set the ingest StatefulSet's replicas to the next step towards the spec (see
    :func:`drain.next_replicas`). A failed read never lowers replicas: the StatefulSet is
    then not applied at all in this pass. Returns a progress message while stepping down."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    names = Names(name)
    sts = result.find("StatefulSet", names.workload("ingest"))
    live_sts = kube.get("apps/v1", "StatefulSet", namespace, names.workload("ingest"))
    uid = body["metadata"].get("uid")
    if live_sts is not None and uid is not None and not owned_by(live_sts, uid):
        live_sts = None  # foreign: refused by apply, its replicas mean nothing here
    live = None if live_sts is None else int((live_sts.get("spec") or {}).get("replicas", 1))
    pods: set[int] = set()
    pvcs: set[int] = set()
    if live is not None and result.ingest_replicas is not None \
            and result.ingest_replicas < live:
        pods = ordinals([p["metadata"]["name"] for p in
                          kube.list("v1", "Pod", namespace, selector_for(name, "ingest"))],
                         lambda n: names.pod_ordinal("ingest", n))
        pvcs = ordinals([p["metadata"]["name"] for p in
                          kube.list("v1", "PersistentVolumeClaim", namespace,
                                    selector_for(name, "ingest"))],
                         lambda n: names.pvc_ordinal("ingest", n))
    replicas = drain.next_replicas(result.ingest_replicas, live, pods, pvcs)
    if result.ingest_replicas is None and not (live_sts and manages_replicas(live_sts)):
        # Autoscaled (or unknown) and the autoscaler owns the field: leave it out.
        sts["spec"].pop("replicas", None)
    elif replicas is None:
        sts["spec"].pop("replicas", None)  # new and autoscaled: the autoscaler decides
    else:
        # While this operator still owns replicas (just switched to an autoscaler that has
        # not written it yet) the live value is re-applied: dropping an owned field would
        # make SSA remove it, and the StatefulSet would default to 1 replica.
        sts["spec"]["replicas"] = replicas
    if result.ingest_replicas is not None and live is not None \
            and result.ingest_replicas < live:
        return (f"ingest stepping down from {live} to {result.ingest_replicas}, one drained "
                f"ordinal at a time (now {replicas})")
    return None


def keep_live_replicas(body: dict[str, Any], live: Mapping[str, Any]) -> None:
    """An autoscaler hand-over's apply ``body``, from the StatefulSet read just before it:
    its live replicas while this operator still owns the field, else no replicas at all
    (the autoscaler wrote them and owns them now)."""
    if manages_replicas(live):
        body["spec"]["replicas"] = int((live.get("spec") or {}).get("replicas", 1))
    else:
        body["spec"].pop("replicas", None)


def expand_volumes(kube: Kube, body: Mapping[str, Any], spec: Mapping[str, Any],
                   problems: list[Problem]) -> None:
    """Grow existing queue PVCs when queue.size grew (volumeClaimTemplates are immutable;
    the StorageClass must allow volume expansion)."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    for tier in ("ingest", "middle", "storage"):
        wanted = builders.pvc_request(spec[tier]["queue"]["size"])
        for pvc in kube.list("v1", "PersistentVolumeClaim", namespace, selector_for(name, tier)):
            requests = ((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}
            current = requests.get("storage")
            if current and quantity_bytes(current) < quantity_bytes(wanted):
                try:
                    kube.patch("v1", "PersistentVolumeClaim", namespace,
                               pvc["metadata"]["name"],
                               {"spec": {"resources": {"requests": {"storage": wanted}}}})
                except KubeError as exc:
                    problems.append(Problem("VolumeExpansionFailed",
                                            f"{pvc['metadata']['name']}: {exc}"))


def _ingest_replicas_and_pods(kube: Kube, name: str, namespace: str, uid: str | None
                              ) -> tuple[int | None, set[str]]:
    sts = kube.get("apps/v1", "StatefulSet", namespace, workload_name(name, "ingest"))
    if sts is None or (uid is not None and not owned_by(sts, uid)):
        return None, set()  # none, or a foreign one: never drain against it
    replicas = int((sts.get("spec") or {}).get("replicas", 1))
    pods = {p["metadata"]["name"]
            for p in kube.list("v1", "Pod", namespace, selector_for(name, "ingest"))}
    return replicas, pods


def drive_drains(kube: Kube, body: Mapping[str, Any], problems: list[Problem],
                 logger: logging.Logger) -> dict[str, list[int]]:
    """Create drain Jobs for retained queues of removed ordinals; delete drained PVCs."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    uid = body["metadata"].get("uid")
    replicas, pods = _ingest_replicas_and_pods(kube, name, namespace, uid)
    if replicas is None:
        return {}  # no StatefulSet (being created or deleted): never drain blindly
    pvcs = [p["metadata"]["name"] for p in
            kube.list("v1", "PersistentVolumeClaim", namespace, selector_for(name, "ingest"))]
    jobs = kube.list("batch/v1", "Job", namespace, selector_for(name, "ingest-drain"))
    plan = drain.plan(name, replicas, pvcs, pods, jobs)
    for action in plan.actions:
        try:
            if action.action == "create_job":
                job = builders.build_drain_job(body, action.ordinal)
                kopf.adopt(job, owner=dict(body))  # type: ignore[arg-type]
                try:
                    kube.create(job)
                except KubeError as exc:
                    if exc.status != 409:  # 409: a previous pass created it already
                        raise
                else:
                    kopf.event(dict(body), type="Normal", reason="DrainStarted",
                               message=f"ingest ordinal {action.ordinal} removed with a "
                                       f"retained queue: started Job {action.name}")
            elif action.action == "delete_pvc":
                # Re-check against fresh state: a scale-up may have brought the pod back.
                fresh_replicas, fresh_pods = _ingest_replicas_and_pods(kube, name, namespace,
                                                                       uid)
                pod = builders.ingest_pod_name(name, action.ordinal)
                if fresh_replicas is None or action.ordinal < fresh_replicas or pod in fresh_pods:
                    logger.info("ordinal %d is back in service; keeping %s",
                                action.ordinal, action.name)
                    continue
                kube.delete("v1", "PersistentVolumeClaim", namespace, action.name)
                kopf.event(dict(body), type="Normal", reason="QueueDrained",
                           message=f"queue of ingest ordinal {action.ordinal} drained; "
                                   f"deleted PVC {action.name}")
            elif action.action == "delete_job":
                kube.delete("batch/v1", "Job", namespace, action.name)
        except KubeError as exc:
            problems.append(Problem("DrainActionFailed",
                                    f"{action.action} {action.name}: {exc}"))
    if plan.failed:
        problems.append(Problem(
            "DrainFailed",
            "drain Job(s) failed for ingest ordinal(s) "
            f"{plan.failed}; their queue PVCs are kept (see kubectl logs job/"
            f"{builders.drain_job_name(name, plan.failed[0])}; delete the Job to retry)"))
    return plan.summary()
