"""Pure decision logic: drain planning, status and conditions, RBAC coverage, kube paths."""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import kopf
import kubernetes
import kubernetes_validate
import pytest
import yaml

from iotpipe_operator import builders, drain, handlers, rbac, stepping
from iotpipe_operator import status as status_mod
from iotpipe_operator.builders import ClusterCapabilities, Problem
from iotpipe_operator.kube import (
    PLURALS,
    ApplyOutcome,
    ForeignObjectError,
    Kube,
    KubeError,
    apply_body,
    resource_path,
)

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def _job(ordinal: int, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": f"demo-ingest-drain-{ordinal}"}, "status": status}


def _pvcs(*ordinals: int) -> list[str]:
    return [f"queue-demo-ingest-{o}" for o in ordinals]


def _actions(plan: drain.DrainPlan) -> list[tuple[str, int]]:
    return [(a.action, a.ordinal) for a in plan.actions]


def test_no_drain_while_every_ordinal_is_in_service() -> None:
    plan = drain.plan("demo", 3, _pvcs(0, 1, 2), {"demo-ingest-0", "demo-ingest-1",
                                                  "demo-ingest-2"}, [])
    assert plan.actions == [] and plan.draining == []


def test_removed_ordinal_with_pod_gone_gets_one_job() -> None:
    plan = drain.plan("demo", 2, _pvcs(0, 1, 2, 3), {"demo-ingest-0", "demo-ingest-1"}, [])
    assert _actions(plan) == [("create_job", 2), ("create_job", 3)]
    assert plan.actions[0].name == "demo-ingest-drain-2"
    # idempotent: with the Jobs running, the next pass does nothing new
    again = drain.plan("demo", 2, _pvcs(0, 1, 2, 3), {"demo-ingest-0", "demo-ingest-1"},
                       [_job(2, active=1), _job(3)])
    assert again.actions == [] and again.draining == [2, 3]


def test_terminating_pod_drains_itself_first() -> None:
    plan = drain.plan("demo", 2, _pvcs(0, 1, 2), {"demo-ingest-0", "demo-ingest-1",
                                                  "demo-ingest-2"}, [])
    assert plan.actions == [] and plan.waiting == [2]


def test_succeeded_job_releases_pvc_then_job() -> None:
    done = _job(2, succeeded=1, conditions=[{"type": "Complete", "status": "True"}])
    plan = drain.plan("demo", 2, _pvcs(0, 1, 2), {"demo-ingest-0", "demo-ingest-1"}, [done])
    assert _actions(plan) == [("delete_pvc", 2), ("delete_job", 2)]
    assert plan.actions[0].name == "queue-demo-ingest-2"
    # PVC already gone: only the Job is tidied up
    tidy = drain.plan("demo", 2, _pvcs(0, 1), {"demo-ingest-0", "demo-ingest-1"}, [done])
    assert _actions(tidy) == [("delete_job", 2)]


def test_failed_job_keeps_the_queue() -> None:
    failed = _job(2, failed=7, conditions=[{"type": "Failed", "status": "True"}])
    plan = drain.plan("demo", 2, _pvcs(0, 1, 2), {"demo-ingest-0", "demo-ingest-1"}, [failed])
    assert plan.actions == [] and plan.failed == [2]


def test_scale_up_cancels_a_running_drain_and_keeps_pvc() -> None:
    plan = drain.plan("demo", 3, _pvcs(0, 1, 2), {"demo-ingest-0", "demo-ingest-1"},
                      [_job(2, active=1)])
    assert _actions(plan) == [("delete_job", 2)]


def test_other_pipelines_pvcs_are_ignored() -> None:
    plan = drain.plan("demo", 1, ["queue-demo2-ingest-5", "queue-demo-middle-3",
                                  "queue-demo-ingest-x"], set(), [])
    assert plan.actions == []
    assert drain.pvc_ordinal("demo", "queue-demo-ingest-12") == 12
    assert drain.pvc_ordinal("de.mo", "queue-deXmo-ingest-1") is None  # names are literal


def _workload(replicas: int, ready: int, generation: int = 1, observed: int = 1
              ) -> dict[str, Any]:
    return {"metadata": {"generation": generation},
            "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas,
                       "observedGeneration": observed}}


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_running_when_every_tier_is_ready() -> None:
    workloads = {t: _workload(2, 2) for t in builders.TIERS}
    status, transitions = status_mod.compute("demo", 3, False, workloads, [], {}, None)
    assert status["phase"] == "Running" and status["observedGeneration"] == 3
    assert _conditions(status) == {"Ready": ("True", "AllTiersReady"),
                                   "Progressing": ("False", "Stable"),
                                   "Degraded": ("False", "AsExpected")}
    assert status["ingest"]["summary"] == "2/2"
    assert status["ingest"]["selector"] == "iotpipe.dev/pipeline=demo,iotpipe.dev/tier=ingest"
    assert {t.condition for t in transitions} == {"Ready", "Progressing", "Degraded"}
    # same inputs again: no transitions, lastTransitionTime kept
    again, transitions = status_mod.compute("demo", 3, False, workloads, [], {}, status)
    assert transitions == []
    assert again["conditions"] == status["conditions"]


def test_status_rolling_out_and_degraded() -> None:
    workloads = {t: _workload(2, 2) for t in builders.TIERS}
    workloads["ingest"] = _workload(3, 1, generation=2, observed=1)
    status, _ = status_mod.compute("demo", 2, False, workloads, [], {}, None)
    assert status["phase"] == "Progressing"
    assert _conditions(status)["Ready"] == ("False", "RollingOut")
    assert status["ingest"]["summary"] == "1/3"
    problem = Problem("KedaNotInstalled", "install KEDA")
    degraded, transitions = status_mod.compute("demo", 2, False, workloads, [problem], {},
                                               status)
    assert degraded["phase"] == "Degraded"
    assert _conditions(degraded)["Degraded"] == ("True", "KedaNotInstalled")
    assert [t.condition for t in transitions] == ["Degraded"]


def test_status_pending_paused_and_draining() -> None:
    nothing = {t: None for t in builders.TIERS}
    status, _ = status_mod.compute("demo", 1, False, nothing, [], {}, None)
    assert status["phase"] == "Pending"
    assert _conditions(status)["Progressing"] == ("True", "Creating")
    paused, _ = status_mod.compute("demo", 1, True, nothing, [], {}, None)
    assert paused["phase"] == "Paused"
    assert paused["drains"] == {"draining": [], "waitingForPod": [], "failed": []}
    assert _conditions(paused)["Progressing"] == ("False", "Paused")
    ready = {t: _workload(1, 1) for t in builders.TIERS}
    draining, _ = status_mod.compute("demo", 1, False, ready, [],
                                     {"draining": [4], "waitingForPod": [], "failed": []}, None)
    assert draining["phase"] == "Progressing"
    assert _conditions(draining)["Progressing"] == ("True", "Draining")


def test_autoscaled_statefulset_without_replicas_counts_as_one() -> None:
    sts = {"spec": {}, "status": {"readyReplicas": 1}}
    assert status_mod.tier_status(sts)["desired"] == 1


def test_rbac_covers_every_kind_the_operator_writes() -> None:
    result = builders.build(yaml.safe_load((REPO / "samples" / "autoscaled-hpa.yaml")
                                           .read_text()),
                            ClusterCapabilities(keda=True, service_monitor=True))
    keda = builders.build(yaml.safe_load((REPO / "samples" / "autoscaled-keda.yaml")
                                         .read_text()), ClusterCapabilities(keda=True))
    children = [*result.children, *keda.children,
                builders.build_drain_job(yaml.safe_load(
                    (REPO / "samples" / "minimal.yaml").read_text()), 1)]
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        plural = PLURALS[child["kind"]]
        for verb in ("create", "patch", "delete", "get"):
            assert rbac.allows(group, plural, verb), (group, plural, verb)
    assert rbac.allows("", "persistentvolumeclaims", "delete")
    assert rbac.allows("iotpipe.dev", "iotpipelines/status", "patch")
    assert rbac.allows("", "events", "create")
    rules = yaml.safe_load(rbac.rules_yaml())
    assert rules == rbac.OPERATOR_RULES


def test_crd_itself_validates_as_a_crd() -> None:
    definition = yaml.safe_load((REPO / "crds" / "iotpipelines.yaml").read_text())
    kubernetes_validate.validate(definition, kubernetes_validate.utils.latest_version(),
                                 strict=True)


def test_resource_paths_and_patch_bodies() -> None:
    assert resource_path("v1", "ConfigMap", "iot", "x") == "/api/v1/namespaces/iot/configmaps/x"
    assert resource_path("iotpipe.dev/v1alpha1", "IoTPipeline", "iot", "p", "status") == (
        "/apis/iotpipe.dev/v1alpha1/namespaces/iot/iotpipelines/p/status")
    with pytest.raises(ValueError, match="does not manage kind"):
        resource_path("v1", "Pod2", "iot")
    sts = builders.build(yaml.safe_load((REPO / "samples" / "minimal.yaml").read_text())
                         ).find("StatefulSet", "demo-ingest")
    live = copy.deepcopy(sts)
    live["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] = "1Mi"
    body = apply_body(sts, live)
    # immutable fields keep their live values (SSA must neither change nor drop them)
    assert body["spec"]["volumeClaimTemplates"] == live["spec"]["volumeClaimTemplates"]
    assert body["spec"]["template"] == sts["spec"]["template"]
    assert "status" not in apply_body({**sts, "status": {"replicas": 1}}, None)


class _RecordingKube(Kube):
    """Kube whose transport is a script: (method, path) -> response or KubeError."""

    def __init__(self, script: list[Any]) -> None:
        super().__init__(kubernetes.client.ApiClient(kubernetes.client.Configuration()))
        self.script = list(script)
        self.calls: list[tuple[str, str, dict[str, str], str]] = []

    def _request_once(self, method: str, path: str, body: Any,
                      query: dict[str, str] | None, content_type: str) -> dict[str, Any]:
        self.calls.append((method, path, dict(query or {}), content_type))
        outcome = self.script.pop(0)
        if isinstance(outcome, KubeError):
            raise outcome
        return dict(outcome)


_CM = {"apiVersion": "v1", "kind": "ConfigMap",
       "metadata": {"name": "c", "namespace": "iot",
                    "ownerReferences": [{"kind": "IoTPipeline", "name": "p", "uid": "u1"}]},
       "data": {"A": "1"}}


def test_apply_creates_missing_then_server_side_applies() -> None:
    # a missing object is created by an apply (all fields owned by the Apply entry) ...
    kube = _RecordingKube([KubeError(404, "NotFound", ""), {"created": True}])
    assert kube.apply(_CM, owner_uid="u1").action == "created"
    assert [c[0] for c in kube.calls] == ["GET", "PATCH"]
    assert kube.calls[1][2:] == ({"fieldManager": "iotpipe-operator", "force": "true"},
                                 "application/apply-patch+yaml")
    # ... or, where an apply of a missing object is a 404 (KMock), by a POST
    kube = _RecordingKube([KubeError(404, "NotFound", ""), KubeError(404, "NotFound", ""),
                           {"created": True}])
    assert kube.apply(_CM, owner_uid="u1").action == "created"
    assert [c[0] for c in kube.calls] == ["GET", "PATCH", "POST"]
    assert kube.calls[2][2] == {"fieldManager": "iotpipe-operator"}

    kube = _RecordingKube([_CM, {"applied": True}])
    assert kube.apply(_CM, owner_uid="u1").action == "applied"
    method, path, query, content_type = kube.calls[1]
    assert (method, path) == ("PATCH", "/api/v1/namespaces/iot/configmaps/c")
    assert query == {"fieldManager": "iotpipe-operator", "force": "true"}
    assert content_type == "application/apply-patch+yaml"


def test_apply_refuses_an_object_the_pipeline_does_not_own() -> None:
    foreign = {**_CM, "metadata": {"name": "c", "namespace": "iot", "ownerReferences": [
        {"kind": "Deployment", "name": "someone", "uid": "other"}]}}
    kube = _RecordingKube([foreign])
    with pytest.raises(ForeignObjectError, match="ConfigMap/c exists and is owned by "
                                                 "Deployment/someone"):
        kube.apply(_CM, owner_uid="u1")
    assert [c[0] for c in kube.calls] == ["GET"], "nothing written to a foreign object"
    kube = _RecordingKube([{**_CM, "metadata": {"name": "c"}}])
    with pytest.raises(ForeignObjectError, match="not owned by any object"):
        kube.apply(_CM, owner_uid="u1")


def test_apply_conflict_rereads_and_reapplies() -> None:
    kube = _RecordingKube([_CM, KubeError(409, "Conflict", "modified"), _CM, {"ok": 1}])
    assert kube.apply(_CM, owner_uid="u1").action == "applied"
    assert [c[0] for c in kube.calls] == ["GET", "PATCH", "GET", "PATCH"]
    # a create race (409 on POST) reads again and applies
    kube = _RecordingKube([KubeError(404, "NotFound", ""), KubeError(404, "NotFound", ""),
                           KubeError(409, "AlreadyExists", ""), _CM, {"ok": 1}])
    assert kube.apply(_CM, owner_uid="u1").action == "applied"


def test_transient_errors_are_retried_with_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(Kube, "_backoff", lambda _self, seconds: sleeps.append(seconds))
    kube = _RecordingKube([KubeError(503, "ServiceUnavailable", ""), KubeError(0, "Unreachable",
                                                                               ""), _CM])
    assert kube.get("v1", "ConfigMap", "iot", "c") == _CM
    assert sleeps == [0.2, 0.4]
    kube = _RecordingKube([KubeError(422, "Invalid", "bad")])
    with pytest.raises(KubeError, match="422"):
        kube.get("v1", "ConfigMap", "iot", "c")  # not transient: raised at once


def test_a_closed_client_stops_retrying_at_once() -> None:
    # A stopping operator closes its client: a handler thread mid-backoff gives up at once
    # instead of waiting out timeouts against a server that no longer answers.
    kube = _RecordingKube([KubeError(0, "Unreachable", "")] * 4)
    closer = threading.Timer(0.05, kube.close)
    closer.start()
    started = time.monotonic()
    with pytest.raises(KubeError, match="Closed"):
        kube.get("v1", "ConfigMap", "iot", "c")
    closer.join()
    assert time.monotonic() - started < 1.0  # the three backoffs alone take 1.4 s
    assert len(kube.calls) == 1


def test_discovery_failure_is_unknown_not_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Kube, "_backoff", lambda _self, _seconds: None)
    assert _RecordingKube([KubeError(503, "ServiceUnavailable", "")] * 2).served(
        "keda.sh/v1alpha1", "ScaledObject") is None
    assert _RecordingKube([KubeError(404, "NotFound", "")]).served(
        "keda.sh/v1alpha1", "ScaledObject") is False
    assert _RecordingKube([{"resources": [{"name": "scaledobjects"}]}]).served(
        "keda.sh/v1alpha1", "ScaledObject") is True


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["render", "--help"],
                                  ["validate", "--help"],
                                  ["crd", "--help"]])
def test_cli_help(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "iotpipe_operator.cli", *argv],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "iotpipe-operator" in out.stdout + out.stderr


def test_cli_rejects_unknown_command_and_bad_settings() -> None:
    out = subprocess.run([sys.executable, "-m", "iotpipe_operator.cli", "deploy"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown command 'deploy'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "iotpipe_operator.cli", "run",
                          "--reconcile-interval", "-1"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "--reconcile-interval" in out.stderr


class _FlakyKube:
    """Accepts every write, answers no object, and fails every list call."""

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.created: list[str] = []

    def served(self, api_version: str, kind: str) -> bool:
        return False

    def apply(self, obj: dict[str, Any], owner_uid: str | None = None,
              from_live: Any = None) -> ApplyOutcome:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "u1"
        self.applied.append(f"{obj['kind']}/{obj['metadata']['name']}")
        return ApplyOutcome("created", obj)

    def delete(self, *args: Any) -> bool:
        return False

    def create_if_absent(self, obj: dict[str, Any]) -> bool:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "u1"
        self.created.append(f"{obj['kind']}/{obj['metadata']['name']}")
        return True

    def get(self, *args: Any) -> dict[str, Any] | None:
        return None

    def list(self, *args: Any) -> list[dict[str, Any]]:
        raise KubeError(500, "InternalError", "etcd is having a bad day")


def test_reconcile_reports_api_failures_instead_of_raising() -> None:
    pipeline = yaml.safe_load((REPO / "samples" / "minimal.yaml").read_text())
    pipeline["metadata"].update(namespace="iot", uid="u1", generation=4)
    kube = _FlakyKube()
    status, _ = handlers.reconcile(kube, pipeline,  # type: ignore[arg-type]
                                   logging.getLogger("test"))
    assert "StatefulSet/demo-ingest" in kube.applied and len(kube.applied) == 20
    assert kube.created == ["ConfigMap/demo-deny-list", "Secret/demo-curve"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "ReadFailed"
    assert "etcd is having a bad day" in degraded["message"]
    assert status["phase"] == "Degraded" and status["observedGeneration"] == 4


class _LiveIngestKube(_FlakyKube):
    """The ingest StatefulSet is live at 5 replicas; every list call fails."""

    def get(self, api_version: str, kind: str, namespace: str, name: str
            ) -> dict[str, Any] | None:
        if kind == "StatefulSet" and name == "demo-ingest":
            return {"metadata": {"name": name, "ownerReferences": [{"uid": "u1"}]},
                    "spec": {"replicas": 5}}
        return None


def test_a_failed_read_never_lowers_replicas_nor_claims_the_generation() -> None:
    pipeline = yaml.safe_load((REPO / "samples" / "minimal.yaml").read_text())  # replicas 2
    pipeline["metadata"].update(namespace="iot", uid="u1", generation=4)
    pipeline["status"] = {"observedGeneration": 3}
    kube = _LiveIngestKube()
    status, _ = handlers.reconcile(kube, pipeline,  # type: ignore[arg-type]
                                   logging.getLogger("test"))
    assert "StatefulSet/demo-ingest" not in kube.applied, "not applied without its pods/PVCs"
    assert "StatefulSet/demo-middle" in kube.applied
    assert status["observedGeneration"] == 3, "generation 4 was not applied in full"


def test_no_handler_talks_to_the_api_after_the_cleanup_activity() -> None:
    """kopf may respawn the timer while it stops; that pass must neither open a new client
    (the cleanup closed the last one) nor fail in a way that keeps kopf retrying."""
    made: list[str] = []

    class CountingKube:
        def close(self) -> None:
            made.append("closed")

    def factory() -> Any:
        made.append("new")
        return CountingKube()

    registry = handlers.make_registry(reconcile_interval=1.0, kube_factory=factory)
    cleanup = next(h for h in registry._activities.get_all_handlers()
                   if h.id.endswith(".close"))
    timer = next(h for h in registry._spawning.get_all_handlers() if h.id == "reconcile")
    cleanup.fn()
    body = kopf.Body({"apiVersion": "iotpipe.dev/v1alpha1", "kind": "IoTPipeline",
                      "metadata": {"name": "demo", "namespace": "iot", "generation": 1},
                      "spec": {}})
    timer.fn(body=body, patch=kopf.Patch(), logger=logging.getLogger("test"),
             stopped=False)  # kopf's DaemonStopped is falsy until the daemon is stopped
    assert made == [], "a pass after the cleanup opened a client"


class _BodyRecordingKube(_RecordingKube):
    def _request_once(self, method: str, path: str, body: Any,
                      query: dict[str, str] | None, content_type: str) -> dict[str, Any]:
        self.bodies.append(body)
        return super()._request_once(method, path, body, query, content_type)

    def __init__(self, script: list[Any]) -> None:
        super().__init__(script)
        self.bodies: list[Any] = []


def _ingest_sts(replicas: int, operator_owns_replicas: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {"f:spec": {"f:template": {}}}
    if operator_owns_replicas:
        fields["f:spec"]["f:replicas"] = {}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "demo-ingest", "namespace": "iot",
                         "ownerReferences": [{"kind": "IoTPipeline", "name": "demo",
                                              "uid": "u1"}],
                         "managedFields": [{"manager": "iotpipe-operator",
                                            "operation": "Apply", "fieldsV1": fields}]},
            "spec": {"replicas": replicas, "template": {"metadata": {}, "spec": {}}}}


def test_an_autoscaler_hand_over_applies_replicas_as_read_just_before_the_apply() -> None:
    # The pass read 4 (the operator owned replicas) and built its body with 4; the HPA
    # then wrote 5 and took the field over. The apply must not put 4 back.
    stale = _ingest_sts(4, operator_owns_replicas=True)
    taken_over = _ingest_sts(5, operator_owns_replicas=False)
    kube = _BodyRecordingKube([taken_over, {"applied": True}])
    kube.apply(stale, owner_uid="u1", from_live=stepping.keep_live_replicas)
    assert "replicas" not in kube.bodies[1]["spec"], "the autoscaler's field is left alone"
    # Still owned by the operator but moved meanwhile (the HPA wrote, not yet taken over
    # in this read): the value as read now, not the one read earlier in the pass.
    kube = _BodyRecordingKube([_ingest_sts(6, operator_owns_replicas=True), {"applied": True}])
    kube.apply(stale, owner_uid="u1", from_live=stepping.keep_live_replicas)
    assert kube.bodies[1]["spec"]["replicas"] == 6
    # Without the hook (every other child) the body is applied as built.
    kube = _BodyRecordingKube([taken_over, {"applied": True}])
    kube.apply(stale, owner_uid="u1")
    assert kube.bodies[1]["spec"]["replicas"] == 4


def test_only_an_autoscaled_ingest_statefulset_takes_replicas_from_live() -> None:
    body = yaml.safe_load((REPO / "samples" / "autoscaled-hpa.yaml").read_text())
    body["metadata"].update({"namespace": "iot", "uid": "u1"})
    result = builders.build(body)
    hooks: dict[str, Any] = {}

    class Recording:
        def apply(self, obj: dict[str, Any], owner_uid: str | None = None,
                  from_live: Any = None) -> ApplyOutcome:
            hooks[f"{obj['kind']}/{obj['metadata']['name']}"] = from_live
            return ApplyOutcome("applied", obj)

    ingest = f"StatefulSet/{builders.workload_name(body['metadata']['name'], 'ingest')}"
    for hand_over in (False, True):
        hooks.clear()
        result.ingest_replicas = None if hand_over else 3
        handlers._apply_children(Recording(), body, result, [],  # type: ignore[arg-type]
                                 logging.getLogger("test"))
        assert ingest in hooks and len(hooks) > 3
        assert hooks[ingest] is (stepping.keep_live_replicas if hand_over else None)
        assert all(hook is None for name, hook in hooks.items() if name != ingest)
