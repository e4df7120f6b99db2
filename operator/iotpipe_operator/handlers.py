"""kopf handlers: fetch, build, apply idempotently with owner references, and report.

All decisions live in pure modules (``builders``, ``drain``, ``status``, ``rotation``); this
module and its two helpers only do I/O: :mod:`stepping` (ingest replicas, drain Jobs, volume
growth) and :mod:`rotating` (CurveZMQ key rotation). One function, :func:`reconcile`, serves
every trigger: create, update, resume (operator restart) and a timer that repairs drift,
refreshes status and drives scale-down drains. It is safe to run again at any time: children
are server-side applied (objects with a child's name that the pipeline does not own are
refused, never adopted), deletes of missing objects are no-ops, drain Jobs have
deterministic names. Each pass works on one snapshot of the body (kopf's body is live and
may change under the handler), and ``observedGeneration`` claims the snapshot's generation
only when every child was applied. API failures are retried inside the call with backoff,
and then by kopf (a temporary error with a growing delay) instead of waiting for the next
timer tick.

Deletion follows ``spec.deletionPolicy`` (see :mod:`iotpipe_operator.deletion`): the delete
handler holds the operator's finalizer until the policy is satisfied.

``spec.paused: true``: the status is still reported, nothing is created, patched or deleted.

Handlers are synchronous on purpose: kopf runs them in its thread pool, so the blocking
``kubernetes`` client never stalls kopf's event loop (or, in tests, the KMock server that
shares it). Calls for one pipeline are serialised by a per-object lock because the timer
and a change handler may fire together.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kopf

from iotpipe import curve
from iotpipe.observability import setup_logging
from iotpipe_operator import builders, crd, deletion, rotating, rotation, stepping
from iotpipe_operator import status as status_mod
from iotpipe_operator.builders import (
    WORKLOAD_KINDS,
    ClusterCapabilities,
    Problem,
    selector_for,
    workload_name,
)
from iotpipe_operator.kube import ForeignObjectError, Kube, KubeError, owned_by
from iotpipe_operator.names import Names

if TYPE_CHECKING:
    from iotpipe_operator.settings import RunSettings

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(uid: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(uid, threading.Lock())


OPTIONAL_APIS = {"keda": ("keda.sh/v1alpha1", "ScaledObject"),
                 "service_monitor": ("monitoring.coreos.com/v1", "ServiceMonitor")}


def capabilities(kube: Kube, known: dict[str, bool] | None = None) -> ClusterCapabilities:
    """Discovery of the optional APIs. A failed discovery keeps the last known answer in
    ``known`` (a 503 is "unknown", never "absent"); unknown with nothing known is None."""
    known = {} if known is None else known
    for key, (api_version, kind) in OPTIONAL_APIS.items():
        served = kube.served(api_version, kind)
        if served is not None:
            known[key] = served
    return ClusterCapabilities(keda=known.get("keda"),
                               service_monitor=known.get("service_monitor"))


def _owned(child: dict[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    kopf.adopt(child, owner=dict(body))  # type: ignore[arg-type]
    return child


def _apply_children(kube: Kube, body: Mapping[str, Any], result: builders.BuildResult,
                    problems: list[Problem], logger: logging.Logger) -> bool:
    """Apply every child and remove the unwanted; True when everything was applied."""
    namespace = body["metadata"]["namespace"]
    uid = body["metadata"].get("uid")
    complete = True
    foreign: list[str] = []
    ingest = workload_name(body["metadata"]["name"], "ingest")
    for child in result.children:
        _owned(child, body)
        # Autoscaled: replicas read at the start of the pass could undo an autoscaler write
        # made since, so the apply takes them from the object as read just before it.
        from_live = stepping.keep_live_replicas if (
            result.ingest_replicas is None and child["kind"] == "StatefulSet"
            and child["metadata"]["name"] == ingest) else None
        try:
            outcome = kube.apply(child, owner_uid=uid, from_live=from_live)
        except ForeignObjectError as exc:
            foreign.append(exc.message)
            complete = False
            continue
        except KubeError as exc:
            problems.append(Problem("ApplyFailed", f"{child['kind']}/"
                                    f"{child['metadata']['name']}: {exc}", retry=True))
            complete = False
            continue
        if outcome.action == "created":
            logger.info("created %s/%s", child["kind"], child["metadata"]["name"])
    if foreign:
        problems.append(Problem("ForeignObject", "; ".join(foreign)))
    for ref in result.absent:
        try:
            live = kube.get(ref.api_version, ref.kind, namespace, ref.name)
            if live is not None and uid is not None and not owned_by(live, uid):
                continue  # never delete what the pipeline does not own
            if live is not None and kube.delete(ref.api_version, ref.kind, namespace,
                                                ref.name):
                logger.info("deleted %s/%s (no longer wanted)", ref.kind, ref.name)
        except KubeError as exc:
            problems.append(Problem("DeleteFailed", f"{ref.kind}/{ref.name}: {exc}",
                                    retry=True))
            complete = False
    return complete


def curve_key_files() -> dict[str, bytes]:
    """A fresh key pair per CurveZMQ role, as ``iotpipe keys generate`` writes them (random:
    made here, in the handler, never in the pure builders)."""
    with tempfile.TemporaryDirectory(prefix="iotpipe-curve-") as tmp:
        curve.generate_keys(tmp)
        return {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir())
                if path.is_file()}


def _create_once(kube: Kube, body: Mapping[str, Any], result: builders.BuildResult,
                 problems: list[Problem], logger: logging.Logger) -> bool:
    """Create the objects the pipeline only ever creates: the deny list ConfigMap (users
    edit it) and the CurveZMQ Secret (its keys must outlive every reconcile; rotation is
    the user's, with ``iotpipe keys``). An existing one is never touched: not patched, not
    adopted, not even read. True when each exists now."""
    meta = body["metadata"]
    wanted = list(result.create_only)
    if result.curve_secret is not None:
        # New random keys each pass: cheap, and discarded unless the Secret is missing.
        wanted.append(builders.curve_secret(meta["name"], meta["namespace"],
                                            curve_key_files()))
    complete = True
    for obj in wanted:
        _owned(obj, body)
        try:
            if kube.create_if_absent(obj):
                logger.info("created %s/%s", obj["kind"], obj["metadata"]["name"])
        except KubeError as exc:
            problems.append(Problem("CreateFailed", f"{obj['kind']}/"
                                    f"{obj['metadata']['name']}: {exc}", retry=True))
            complete = False
    return complete


def reconcile(kube: Kube, body: Mapping[str, Any], logger: logging.Logger,
              known: dict[str, bool] | None = None, direct_metrics: bool = False
              ) -> tuple[dict[str, Any], list[status_mod.Transition]]:
    """One full pass for one pipeline; returns the new status and condition transitions."""
    body = copy.deepcopy(dict(body))  # one snapshot per pass: kopf's body is live
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    spec = crd.defaulted_spec(body.get("spec"))
    problems: list[Problem] = []
    drains: dict[str, list[int]] = {}
    scaling: str | None = None
    rotated: rotation.Step | None = None
    applied = spec["paused"]  # paused: nothing to apply, the generation is observed
    deleting = bool(meta.get("deletionTimestamp"))
    with _lock_for(meta.get("uid") or f"{namespace}/{name}"):
        try:
            caps = capabilities(kube, known)
            result = builders.build(body, caps)
        except KubeError as exc:
            problems.append(Problem("BuildFailed", str(exc), retry=True))
            result = None
        except ValueError as exc:
            problems.append(Problem("BuildFailed", str(exc)))
            result = None
        if result is not None:
            problems += result.problems
            if not spec["paused"] and not deleting:  # deletion: the delete handler drives
                stepped = True
                try:
                    scaling = stepping.step_ingest_replicas(kube, body, result)
                except KubeError as exc:
                    problems.append(Problem("ReadFailed", str(exc), retry=True))
                    stepped = False  # never guess replicas: leave the StatefulSet alone
                    result.children = [c for c in result.children if not (
                        c["kind"] == "StatefulSet"
                        and c["metadata"]["name"] == workload_name(name, "ingest"))]
                # Before the workloads: their pods mount these.
                created = _create_once(kube, body, result, problems, logger)
                # A step-down still in progress counts as applied: what remains is waiting.
                applied = _apply_children(kube, body, result, problems, logger) and stepped \
                    and created
                try:
                    stepping.expand_volumes(kube, body, spec, problems)
                    drains = stepping.drive_drains(kube, body, problems, logger)
                except KubeError as exc:  # a failed read: report, retry
                    problems.append(Problem("ReadFailed", str(exc), retry=True))
                if created:
                    try:
                        rotated = rotating.rotate_curve(kube, body, spec, direct_metrics, logger)
                    except KubeError as exc:
                        problems.append(Problem("CurveRotationFailed", str(exc), retry=True))
        workloads: dict[str, dict[str, Any] | None] = {}
        for tier, (api_version, kind) in WORKLOAD_KINDS.items():
            try:
                workloads[tier] = kube.get(api_version, kind, namespace,
                                           workload_name(name, tier))
            except KubeError as exc:
                problems.append(Problem("StatusReadFailed", f"{kind}/{name}-{tier}: {exc}",
                                        retry=True))
                workloads[tier] = None
    previous = body.get("status") or {}
    # Claim a generation only once it is applied in full.
    generation = meta.get("generation") if applied else previous.get("observedGeneration")
    new_status, transitions = status_mod.compute(name, generation, spec["paused"], workloads,
                                                 problems, drains, previous, scaling=scaling)
    rotating.report_rotation(new_status, transitions, previous, rotated, generation)
    return new_status, transitions


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


def _delete_pass(kube: Kube, body: Mapping[str, Any], logger: logging.Logger,
                 direct_metrics: bool) -> deletion.Step:
    """One pass of a Drain deletion: observe, decide, act (see :mod:`deletion`)."""
    meta = body["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    names = Names(name)
    spec = crd.defaulted_spec(body.get("spec"))
    with _lock_for(meta.get("uid") or f"{namespace}/{name}"):
        uid = meta.get("uid") or ""
        live_sts = kube.get("apps/v1", "StatefulSet", namespace, names.workload("ingest"))
        if live_sts is not None and not owned_by(live_sts, uid):
            live_sts = None  # a foreign object with the child's name is never touched
        obs = deletion.Observation(
            ingest_replicas=None if live_sts is None
            else int((live_sts.get("spec") or {}).get("replicas", 1)))
        obs.ingest_pods = stepping.ordinals(
            [p["metadata"]["name"] for p in
             kube.list("v1", "Pod", namespace, selector_for(name, "ingest"))],
            lambda n: names.pod_ordinal("ingest", n))
        obs.ingest_pvcs = stepping.ordinals(
            [p["metadata"]["name"] for p in
             kube.list("v1", "PersistentVolumeClaim", namespace, selector_for(name, "ingest"))],
            lambda n: names.pvc_ordinal("ingest", n))
        obs.drain_jobs = stepping.ordinals(
            [j["metadata"]["name"] for j in
             kube.list("batch/v1", "Job", namespace, selector_for(name, "ingest-drain"))],
            names.drain_job_ordinal)
        autoscalers = [("autoscaling/v2", "HorizontalPodAutoscaler"),
                       ("keda.sh/v1alpha1", "ScaledObject")]
        for api_version, kind in autoscalers:
            if kind == "ScaledObject" and not kube.served(api_version, kind):
                continue
            autoscaler = kube.get(api_version, kind, namespace, names.workload("ingest"))
            if autoscaler is not None and owned_by(autoscaler, uid):
                obs.autoscalers.append(f"{kind}/{names.workload('ingest')}")
        if not (obs.ingest_replicas or obs.ingest_pods or obs.ingest_pvcs or obs.drain_jobs):
            group = spec["storage"]["group"]
            obs.middle = {p["metadata"]["name"]: _read_depth(
                kube, namespace, p, direct_metrics,
                lambda text: deletion.middle_backlog(text, group), logger)
                for p in kube.list("v1", "Pod", namespace, selector_for(name, "middle"))}
            obs.storage = {p["metadata"]["name"]: _read_depth(
                kube, namespace, p, direct_metrics, deletion.storage_in_flight, logger)
                for p in kube.list("v1", "Pod", namespace, selector_for(name, "storage"))}
        step = deletion.decide(obs)
        if step.delete_autoscalers:
            for api_version, kind in autoscalers:
                if f"{kind}/{names.workload('ingest')}" in obs.autoscalers:
                    kube.delete(api_version, kind, namespace, names.workload("ingest"))
        if step.ingest_replicas is not None and step.ingest_replicas != obs.ingest_replicas:
            kube.patch("apps/v1", "StatefulSet", namespace, names.workload("ingest"),
                       {"spec": {"replicas": step.ingest_replicas}})
            logger.info("deletion: ingest replicas %s -> %s", obs.ingest_replicas,
                        step.ingest_replicas)
        problems: list[Problem] = []
        stepping.drive_drains(kube, body, problems, logger)
        for problem in problems:
            logger.warning("deletion: %s: %s", problem.reason, problem.message)
    return step


def _read_depth(kube: Kube, namespace: str, pod: dict[str, Any], direct: bool,
                parse: Callable[[str], float | None], logger: logging.Logger) -> float | None:
    try:
        return parse(kube.pod_metrics(namespace, pod, builders.METRICS_PORT, direct=direct))
    except KubeError as exc:
        logger.info("deletion: metrics of %s unreadable: %s", pod["metadata"]["name"], exc)
        return None


def _set_condition(body: Mapping[str, Any], patch: kopf.Patch, kind: str, status: str,
                   reason: str, message: str) -> None:
    previous = list((body.get("status") or {}).get("conditions") or [])
    condition, _ = status_mod.condition(previous, kind, status, reason, message,
                                        body["metadata"].get("generation"))
    patch.status["conditions"] = [c for c in previous if c.get("type") != kind] + [condition]


def make_registry(reconcile_interval: float = 60.0,
                  kube_factory: Callable[[], Kube] = Kube.from_environment,
                  scanning: bool = True, direct_metrics: bool = False
                  ) -> kopf.OperatorRegistry:
    """A fresh registry with every handler (tests make one per operator instance)."""
    registry = kopf.OperatorRegistry()
    clients: dict[str, Kube] = {}
    announced: dict[tuple[str, str], str] = {}
    known: dict[str, bool] = {}  # last known optional APIs (survives failed discovery)
    clients_guard = threading.Lock()
    # Set by the cleanup activity: kopf may still start a handler while it stops (a timer
    # respawned by a last patch); such a pass must not open a new client and talk on.
    stopping = threading.Event()
    # Retries of API failures and deletion polls: soon, never slower than the timer.
    poll = min(5.0, reconcile_interval)

    def kube() -> Kube:
        with clients_guard:
            if stopping.is_set():
                raise KubeError(0, "Closed", "the operator is stopping")
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

    def handle(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
               retry: int = 0) -> None:
        new_status, transitions = reconcile(kube(), body, logger, known, direct_metrics)
        _report(body, patch, new_status, transitions, announced)
        failed = [c for c in new_status["conditions"]
                  if c["type"] == "Degraded" and c["status"] == "True"]
        if failed and _retryable(failed[0]["reason"]):
            # The status is patched all the same; kopf calls again after the delay.
            raise kopf.TemporaryError(failed[0]["message"],
                                      delay=min(poll * 2**min(retry, 4), 60.0))

    @kopf.on.resume(*resource, id="resume", registry=registry)
    def on_resume(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                  retry: int, **_: Any) -> None:
        handle(body, patch, logger, retry)

    @kopf.on.create(*resource, id="create", registry=registry)
    def on_create(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                  retry: int, **_: Any) -> None:
        handle(body, patch, logger, retry)

    @kopf.on.update(*resource, id="update", registry=registry)
    def on_update(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                  retry: int, **_: Any) -> None:
        handle(body, patch, logger, retry)

    @kopf.timer(*resource, id="reconcile", interval=reconcile_interval,
                # startup is covered by the resume handler; the timer repairs drift later
                initial_delay=reconcile_interval, backoff=poll, registry=registry)
    def on_timer(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                 stopped: kopf.DaemonStopped, **_: Any) -> None:
        # kopf retries a timer that failed temporarily within the same tick, and keeps
        # doing so while the operator stops: a pass while stopping ends quietly instead,
        # or a lasting failure (KEDA's API down) would hold the shutdown forever.
        if stopped or stopping.is_set():
            return
        try:
            handle(body, patch, logger)
        except (kopf.TemporaryError, KubeError):
            if stopped or stopping.is_set():
                return
            raise

    @kopf.on.delete(*resource, id="delete", registry=registry)
    def on_delete(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                  **_: Any) -> None:
        snapshot = copy.deepcopy(dict(body))
        meta = snapshot["metadata"]
        policy = crd.defaulted_spec(snapshot.get("spec"))["deletionPolicy"]
        uid = meta.get("uid") or meta["name"]
        if policy == "Retain":
            message = (f"children removed; queue, log and store PVCs kept (kubectl get pvc -l "
                       f"{builders.PIPELINE_LABEL}={meta['name']}). Recreate IoTPipeline "
                       f"{meta['name']} in {meta['namespace']} to reattach them and forward "
                       f"what they hold, or delete them when no longer wanted.")
            with _locks_guard:  # kopf may call again before the finalizer is gone
                first = (uid, "Retained") not in announced
                announced[(uid, "Retained")] = "True"
            if first:
                kopf.event(snapshot, type="Normal", reason="Retained", message=message)
            return
        if policy == "Delete":
            return
        try:
            step = _delete_pass(kube(), snapshot, logger, direct_metrics)
        except KubeError as exc:
            step = deletion.Step(False, "DeletionReadFailed", str(exc))
        patch.status["phase"] = "Deleting"
        _set_condition(snapshot, patch, "Deleting", "False" if step.done else "True",
                       step.reason, step.message)
        key = (uid, "Deleting")
        with _locks_guard:
            before, announced[key] = announced.get(key), step.reason
        if before != step.reason:
            kopf.event(snapshot, type="Normal", reason=step.reason, message=step.message)
        if not step.done:
            raise kopf.TemporaryError(step.message, delay=poll)

    @kopf.on.cleanup(registry=registry)
    def close(**_: Any) -> None:
        with clients_guard:
            stopping.set()
            client = clients.pop("kube", None)
        if client is not None:
            client.close()

    return registry


RETRYABLE = ("ApplyFailed", "CreateFailed", "DeleteFailed", "ReadFailed", "StatusReadFailed",
             "DrainActionFailed", "BuildFailed", "DiscoveryFailed", "CurveRotationFailed")


def _retryable(reason: str) -> bool:
    return reason in RETRYABLE


def run(settings: RunSettings) -> int:
    """``iotpipe-operator run``: the kopf operator until SIGTERM."""
    setup_logging("operator", settings.log_level)  # JSON lines on stderr, like every tier
    registry = make_registry(settings.reconcile_interval, scanning=settings.scanning,
                             direct_metrics=settings.metrics_access == "direct")
    # An explicit peering name makes peering mandatory in kopf: pass it only when peering.
    kopf.run(registry=registry, standalone=settings.standalone,
             peering_name=None if settings.standalone else settings.peering_name,
             liveness_endpoint=settings.liveness_endpoint or None,
             clusterwide=not settings.namespaces, namespaces=settings.namespaces)
    return 0
