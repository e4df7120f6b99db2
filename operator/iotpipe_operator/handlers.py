"""kopf handlers: fetch, build, apply idempotently with owner references, and report.

All decisions live in pure modules (``builders``, ``drain``, ``status``); this module only
does I/O. One function, :func:`reconcile`, serves every trigger: create, update, resume
(operator restart) and a timer that repairs drift, refreshes status and drives scale-down
drains. It is safe to run again at any time: creates that exist become merge patches,
deletes of missing objects are no-ops, drain Jobs have deterministic names.

``spec.paused: true``: the status is still reported, nothing is created, patched or deleted.

Handlers are synchronous on purpose: kopf runs them in its thread pool, so the blocking
``kubernetes`` client never stalls kopf's event loop (or, in tests, the KMock server that
shares it). Calls for one pipeline are serialised by a per-object lock because the timer
and a change handler may fire together.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import kopf

from iotpipe.observability import setup_logging
from iotpipe_operator import builders, crd, drain
from iotpipe_operator import status as status_mod
from iotpipe_operator.builders import ClusterCapabilities, Problem, selector_for, workload_name
from iotpipe_operator.kube import Kube, KubeError
from iotpipe_operator.quantity import quantity_bytes

if TYPE_CHECKING:
    from iotpipe_operator.cli import RunSettings

WORKLOAD_KINDS = {"ingest": ("apps/v1", "StatefulSet"), "middle": ("apps/v1", "StatefulSet"),
                  "relay": ("apps/v1", "Deployment"), "storage": ("apps/v1", "StatefulSet")}

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(uid: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


def capabilities(kube: Kube) -> ClusterCapabilities:
    return ClusterCapabilities(
        keda=kube.served("keda.sh/v1alpha1", "ScaledObject"),
        service_monitor=kube.served("monitoring.coreos.com/v1", "ServiceMonitor"))


def _apply_children(kube: Kube, body: Mapping[str, Any], result: builders.BuildResult,
                    problems: list[Problem], logger: logging.Logger) -> None:
    namespace = body["metadata"]["namespace"]
    for child in result.children:
        kopf.adopt(child, owner=dict(body))  # type: ignore[arg-type]
        try:
            outcome = kube.apply(child)
        except KubeError as exc:
            problems.append(Problem("ApplyFailed", f"{child['kind']}/"
                                    f"{child['metadata']['name']}: {exc}"))
            continue
        if outcome.action == "created":
            logger.info("created %s/%s", child["kind"], child["metadata"]["name"])
    for ref in result.absent:
        try:
            if kube.delete(ref.api_version, ref.kind, namespace, ref.name):
                logger.info("deleted %s/%s (no longer wanted)", ref.kind, ref.name)
        except KubeError as exc:
            problems.append(Problem("DeleteFailed", f"{ref.kind}/{ref.name}: {exc}"))


def _expand_volumes(kube: Kube, body: Mapping[str, Any], spec: Mapping[str, Any],
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


def _ingest_replicas_and_pods(kube: Kube, name: str, namespace: str
                              ) -> tuple[int | None, set[str]]:
    sts = kube.get("apps/v1", "StatefulSet", namespace, workload_name(name, "ingest"))
    if sts is None:
        return None, set()
    replicas = int((sts.get("spec") or {}).get("replicas", 1))
    pods = {p["metadata"]["name"]
            for p in kube.list("v1", "Pod", namespace, selector_for(name, "ingest"))}
    return replicas, pods


def _drive_drains(kube: Kube, body: Mapping[str, Any], problems: list[Problem],
                  logger: logging.Logger) -> dict[str, list[int]]:
    """Create drain Jobs for retained queues of removed ordinals; delete drained PVCs."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    replicas, pods = _ingest_replicas_and_pods(kube, name, namespace)
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
                fresh_replicas, fresh_pods = _ingest_replicas_and_pods(kube, name, namespace)
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


def reconcile(kube: Kube, body: Mapping[str, Any], logger: logging.Logger
              ) -> tuple[dict[str, Any], list[status_mod.Transition]]:
    """One full pass for one pipeline; returns the new status and condition transitions."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = crd.defaulted_spec(body.get("spec"))
    problems: list[Problem] = []
    drains: dict[str, list[int]] = {}
    with _lock_for(meta.get("uid") or f"{namespace}/{name}"):
        try:
            caps = capabilities(kube)
            result = builders.build(body, caps)
        except (KubeError, ValueError) as exc:
            problems.append(Problem("BuildFailed", str(exc)))
            result = None
        if result is not None:
            problems += result.problems
            if not spec["paused"]:
                _apply_children(kube, body, result, problems, logger)
                try:
                    _expand_volumes(kube, body, spec, problems)
                    drains = _drive_drains(kube, body, problems, logger)
                except KubeError as exc:  # a failed read: report, retry on the next pass
                    problems.append(Problem("ReadFailed", str(exc)))
        workloads: dict[str, dict[str, Any] | None] = {}
        for tier, (api_version, kind) in WORKLOAD_KINDS.items():
            try:
                workloads[tier] = kube.get(api_version, kind, namespace,
                                           workload_name(name, tier))
            except KubeError as exc:
                problems.append(Problem("StatusReadFailed", f"{kind}/{name}-{tier}: {exc}"))
                workloads[tier] = None
    return status_mod.compute(name, meta.get("generation"), spec["paused"], workloads,
                              problems, drains, body.get("status"))


def _report(body: Mapping[str, Any], patch: kopf.Patch, new_status: dict[str, Any],
            transitions: list[status_mod.Transition], announced: dict[tuple[str, str], str]
            ) -> None:
    """Patch the status; one event per condition transition. ``announced`` remembers the
    statuses already announced per object: the timer and a change handler may both
    compute the same transition from the same old status."""
    patch.status.update(new_status)
    uid = body["metadata"].get("uid") or body["metadata"]["name"]
    had_conditions = bool((body.get("status") or {}).get("conditions"))
    for change in transitions:
        key = (uid, change.condition)
        with _locks_guard:
            before = announced.get(key)
            announced[key] = change.status
        if before == change.status:
            continue
        if before is None and change.status == "False" and not had_conditions:
            continue  # the first report is not a transition worth an event
        warning = (change.condition, change.status) in (("Degraded", "True"), ("Ready", "False"))
        kopf.event(dict(body), type="Warning" if warning else "Normal", reason=change.reason,
                   message=f"{change.condition}={change.status}: {change.message}")


def make_registry(reconcile_interval: float = 60.0,
                  kube_factory: Callable[[], Kube] = Kube.from_environment,
                  scanning: bool = True) -> kopf.OperatorRegistry:
    """A fresh registry with every handler (tests make one per operator instance)."""
    registry = kopf.OperatorRegistry()
    clients: dict[str, Kube] = {}
    announced: dict[tuple[str, str], str] = {}
    clients_guard = threading.Lock()

    def kube() -> Kube:
        with clients_guard:
            if "kube" not in clients:
                clients["kube"] = kube_factory()
            return clients["kube"]

    resource = (crd.GROUP, crd.VERSION, crd.PLURAL)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A custom registry has no default login handler: use the kubernetes client's
        # (in-cluster service account, else $KUBECONFIG).
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Our own prefix for kopf's bookkeeping annotations and finalizer.
        settings.persistence.finalizer = "iotpipe.dev/operator"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
            prefix="iotpipe.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="iotpipe.dev", key="last-handled-configuration")
        # Only explicit events (condition transitions, drains), not every log line.
        settings.posting.level = logging.WARNING
        settings.execution.max_workers = 8
        if not scanning:
            settings.scanning.disabled = True

    def handle(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger) -> None:
        new_status, transitions = reconcile(kube(), body, logger)
        _report(body, patch, new_status, transitions, announced)

    @kopf.on.resume(*resource, id="resume", registry=registry)
    def on_resume(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                  **_: Any) -> None:
        handle(body, patch, logger)

    @kopf.on.create(*resource, id="create", registry=registry)
    def on_create(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                  **_: Any) -> None:
        handle(body, patch, logger)

    @kopf.on.update(*resource, id="update", registry=registry)
    def on_update(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                  **_: Any) -> None:
        handle(body, patch, logger)

    @kopf.timer(*resource, id="reconcile", interval=reconcile_interval,
                # startup is covered by the resume handler; the timer repairs drift later
                initial_delay=reconcile_interval, registry=registry)
    def on_timer(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                 **_: Any) -> None:
        handle(body, patch, logger)

    @kopf.on.cleanup(registry=registry)
    def close(**_: Any) -> None:
        with clients_guard:
            client = clients.pop("kube", None)
        if client is not None:
            client.close()

    return registry


def run(settings: RunSettings) -> int:
    """``iotpipe-operator run``: the kopf operator until SIGTERM."""
    setup_logging("operator", settings.log_level)  # JSON lines on stderr, like every tier
    registry = make_registry(settings.reconcile_interval, scanning=settings.scanning)
    # An explicit peering name makes peering mandatory in kopf: pass it only when peering.
    kopf.run(registry=registry, standalone=settings.standalone,
             peering_name=None if settings.standalone else settings.peering_name,
             liveness_endpoint=settings.liveness_endpoint or None,
             clusterwide=not settings.namespaces, namespaces=settings.namespaces)
    return 0
