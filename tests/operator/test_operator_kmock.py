"""The operator running against KMock's KubernetesEmulator (kopf 1.45 + KMock 0.8).

KMock stores objects and streams watch events, but runs no controllers, garbage
collection, schemas or CEL; :class:`support.apiserver.ApiServerEmulator` adds the metadata,
server-side apply and the pod proxy. The tests seed the pipeline themselves and play the
controllers' part (StatefulSet status, pods, PVCs, Job status) where a scenario needs it;
``tests/cluster`` runs the same operator against controllers and real tier processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import signal
import sys
import warnings
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import kmock
import kopf
import kubernetes
import pytest
import yaml
from support import waiting
from support.apiserver import ApiServerEmulator

from iotpipe_operator import handlers, stepping
from iotpipe_operator.kube import Kube

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120),
              pytest.mark.kmock(cls=ApiServerEmulator)]

REPO = Path(__file__).resolve().parents[2]
NS = "iot"
PIPELINES = "iotpipe.dev/v1alpha1/iotpipelines"
STATEFULSETS = "apps/v1/statefulsets"
DEPLOYMENTS = "apps/v1/deployments"
CONFIGMAPS = "v1/configmaps"
SERVICES = "v1/services"
PVCS = "v1/persistentvolumeclaims"
PODS = "v1/pods"
JOBS = "batch/v1/jobs"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
SCALEDOBJECTS = "keda.sh/v1alpha1/scaledobjects"
EVENTS = "v1/events"
_versions = itertools.count(100)


def _sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "samples" / name).read_text())


def seeded(pipeline: dict[str, Any], uid: str = "uid-1") -> dict[str, Any]:
    """What an API server would have stored: namespace, uid, versions."""
    meta = pipeline["metadata"]
    meta.update(namespace=NS, uid=uid, generation=1, resourceVersion=str(next(_versions)),
                creationTimestamp="2026-11-26T12:00:00Z")
    return pipeline


def obj(emulator: Any, resource: str, name: str) -> dict[str, Any] | None:
    wanted = kmock.resource(resource)
    wanted_key = (wanted.group, wanted.version, wanted.plural, NS, name)
    for (res, ns, stored_name), stored in emulator.objects.items():
        if (res.group, res.version, res.plural, ns, stored_name) == wanted_key:
            return None if stored.deleted else stored.raw
    return None


def names(emulator: Any, resource: str) -> set[str]:
    wanted = kmock.resource(resource)
    return {name for (res, ns, name), stored in emulator.objects.items()
            if (res.group, res.version, res.plural) == (wanted.group, wanted.version,
                                                        wanted.plural)
            and ns == NS and not stored.deleted}


# Every wait here is bounded by 30 s unless it says otherwise.
eventually = partial(waiting.eventually, within=30.0)


class Cluster:
    """KMock as the API server plus helpers to act like users and controllers."""

    def __init__(self, emulator: Any) -> None:
        self.k = emulator

    async def send(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        # Connection: close, so no keep-alive server task outlives the request (kopf waits
        # for every task spawned while it runs before it stops).
        headers = {"Connection": "close"}
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        async with self.k.request(method, path, json=body, headers=headers) as response:
            text = await response.text()
            assert response.status < 300, f"{method} {path}: {response.status} {text}"
            return json.loads(text) if text else {}

    async def create_pipeline(self, pipeline: dict[str, Any]) -> None:
        await self.send("POST", f"/apis/iotpipe.dev/v1alpha1/namespaces/{NS}/iotpipelines",
                        pipeline)

    async def patch_pipeline(self, name: str, spec_patch: dict[str, Any]) -> None:
        current = obj(self.k, PIPELINES, name)
        assert current is not None
        meta = current["metadata"]
        await self.send("PATCH", f"/apis/iotpipe.dev/v1alpha1/namespaces/{NS}/iotpipelines/{name}",
                        {"metadata": {"generation": meta["generation"] + 1,
                                      "resourceVersion": str(next(_versions))},
                         "spec": spec_patch})

    async def put(self, resource: str, body: dict[str, Any]) -> None:
        """Create an object as a controller would (e.g. a PVC from a claim template)."""
        res = kmock.resource(resource)
        prefix = f"/api/{res.version}" if not res.group else f"/apis/{res.group}/{res.version}"
        body["metadata"].setdefault("namespace", NS)
        body["metadata"].setdefault("uid", f"uid-{body['metadata']['name']}")
        await self.send("POST", f"{prefix}/namespaces/{NS}/{res.plural}", body)

    async def patch(self, resource: str, name: str, body: dict[str, Any]) -> None:
        res = kmock.resource(resource)
        prefix = f"/api/{res.version}" if not res.group else f"/apis/{res.group}/{res.version}"
        await self.send("PATCH", f"{prefix}/namespaces/{NS}/{res.plural}/{name}", body)

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [event for name in names(self.k, EVENTS)
                if (event := obj(self.k, EVENTS, name)) and event.get("reason") == reason]

    def status(self, name: str) -> dict[str, Any]:
        current = obj(self.k, PIPELINES, name) or {}
        return current.get("status") or {}

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        return next((c for c in self.status(name).get("conditions", [])
                     if c["type"] == kind), None)


async def _trim_request_log(emulator: Any) -> None:
    """KMock matches each request against its whole request log (quadratic over a test);
    an operator makes thousands of requests, so keep only the recent ones."""
    while True:
        await asyncio.sleep(0.2)
        del emulator._requests[:-100]


@pytest.fixture
async def cluster(kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[Cluster]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # KMock's importlib call
        kmock.resources.load_bundled()
    kmock.resources[PIPELINES] = kmock.ResourceInfo(
        kind="IoTPipeline", singular="iotpipeline", namespaced=True, shortnames={"iotp"},
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        subresources={"status"})
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
        "users": [{"name": "kmock", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                                   "namespace": NS}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    # kopf's login_via_client uses the location the kubernetes package read at import time.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        str(kubeconfig))
    trimmer = asyncio.create_task(_trim_request_log(kmock))
    try:
        yield Cluster(kmock)
    finally:
        trimmer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trimmer


def install_keda(cluster: Cluster) -> None:
    cluster.k.resources[SCALEDOBJECTS] = kmock.ResourceInfo(
        kind="ScaledObject", singular="scaledobject", namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "update", "delete"})


@contextlib.asynccontextmanager
async def operator(interval: float) -> AsyncIterator[None]:
    """kopf running in this event loop until the block ends; ``interval`` is the timer's
    (long where a test relies on change handlers alone, short where on the timer)."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True
    settings.watching.reconnect_backoff = 0.2
    settings.networking.request_timeout = 10
    settings.background.instant_exit_timeout = 0.5
    settings.queueing.exit_timeout = 1.0
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=4)
    settings.execution.executor = executor
    stop = asyncio.Event()
    clients: list[Kube] = []

    def kube_factory() -> Kube:
        # Short API timeouts: a request KMock drops while the operator stops must not
        # outlast the shutdown allowance below.
        clients.append(Kube.from_environment(timeout=5.0))
        return clients[-1]

    task = asyncio.create_task(kopf.operator(
        registry=handlers.make_registry(reconcile_interval=interval, kube_factory=kube_factory),
        settings=settings, standalone=True, namespaces=[NS], stop_flag=stop))
    try:
        yield
    finally:
        stop.set()
        for client in clients:  # handler threads mid-retry give up now (kopf cancels the
            client.close()      # KMock server tasks that would have answered them)
        # kopf then waits up to 5 s for every task spawned meanwhile, including KMock's
        # never-ending server side of watch streams: cancel once kopf's own parts are done.
        await asyncio.wait({task}, timeout=2)
        # kopf stops its root tasks with a 10 s grace each on cancellation; on a loaded
        # machine that takes longer than 10 s, so allow it plenty (still bounded). kopf
        # cancels a hung handler task once, and Python 3.11's wait_for can swallow a
        # cancellation that races a wake-up: cancel again each second until it is done.
        deadline = asyncio.get_running_loop().time() + 45
        while not task.done():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("kopf did not stop within 45 s of its stop flag")
            task.cancel()
            await asyncio.wait({task}, timeout=1)
        # Let handler threads still talking to KMock finish while its loop still runs.
        await asyncio.wait_for(asyncio.to_thread(executor.shutdown, wait=True), timeout=20)
    if not task.cancelled() and task.exception():
        raise task.exception()  # type: ignore[misc]


async def test_emulator_refuses_a_failed_json_patch_test_with_422(cluster: Cluster) -> None:
    # As a real API server does; kopf then retries its finalizer patch against the fresh
    # object on its next cycle (a 500 made it resend the same stale patch for 30 s).
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    path = f"/apis/iotpipe.dev/v1alpha1/namespaces/{NS}/iotpipelines/demo"
    created = obj(cluster.k, PIPELINES, "demo")
    assert created is not None
    stale = created["metadata"]["resourceVersion"]
    await cluster.send("PATCH", path, {"metadata": {"labels": {"touched": "yes"},
                                                    "resourceVersion": str(next(_versions))}})
    ops = [{"op": "test", "path": "/metadata/resourceVersion", "value": stale},
           {"op": "add", "path": "/metadata/labels/second", "value": "no"}]
    async with cluster.k.request("PATCH", path, json=ops, headers={
            "Content-Type": "application/json-patch+json", "Connection": "close"}) as response:
        assert response.status == 422, await response.text()
    current = obj(cluster.k, PIPELINES, "demo")
    assert current is not None
    labels = current["metadata"]["labels"]
    assert labels.get("touched") == "yes" and "second" not in labels


async def test_create_builds_owned_children_and_status(cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    async with operator(interval=30):
        await eventually(lambda: obj(cluster.k, STATEFULSETS, "demo-ingest"), what="ingest sts")
        await eventually(lambda: cluster.status("demo").get("phase"), what="status")
    for resource, name in [(STATEFULSETS, "demo-ingest"), (STATEFULSETS, "demo-middle"),
                           (STATEFULSETS, "demo-storage"), (DEPLOYMENTS, "demo-relay"),
                           (CONFIGMAPS, "demo-ingest-config"), (SERVICES, "demo-ingest")]:
        child = obj(cluster.k, resource, name)
        assert child is not None, name
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["kind"] == "IoTPipeline" and owner["uid"] == "uid-1"
        assert owner["controller"] is True and owner["blockOwnerDeletion"] is True
    status = cluster.status("demo")
    assert status["observedGeneration"] == 1
    assert {c["type"] for c in status["conditions"]} == {"Ready", "Progressing", "Degraded",
                                                         "CurveKeysRotating"}
    rotating = cluster.condition("demo", "CurveKeysRotating")
    assert (rotating["status"], rotating["reason"]) == ("False", "Idle")
    assert status["ingest"]["desired"] == 2 and status["ingest"]["summary"] == "0/2"
    assert status["phase"] == "Progressing"
    assert cluster.condition("demo", "Ready")["status"] == "False"


def _hash(workload: dict[str, Any] | None) -> str:
    assert workload is not None
    return workload["spec"]["template"]["metadata"]["annotations"]["iotpipe.dev/config-hash"]


async def test_spec_change_patches_children_and_rolls_pods(cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    await _controller_pods_and_pvcs(cluster, [0, 1], [0, 1])
    async with operator(interval=30):
        sts = await eventually(lambda: obj(cluster.k, STATEFULSETS, "demo-ingest"),
                               what="ingest sts")
        before = _hash(sts)
        await eventually(lambda: obj(cluster.k, DEPLOYMENTS, "demo-relay"), what="relay")
        relay_before = _hash(obj(cluster.k, DEPLOYMENTS, "demo-relay"))
        await cluster.patch_pipeline("demo", {"ingest": {"replicas": 3, "rateLimit": 10,
                                                         "queue": {"size": "2Gi"}}})
        await eventually(lambda: (obj(cluster.k, CONFIGMAPS, "demo-ingest-config") or {})
                         .get("data", {}).get("IOTPIPE_INGEST_RATE_LIMIT") == "10",
                         what="rate limit in the ingest ConfigMap")
        # removing a setting removes it from the tier's ConfigMap too
        await cluster.patch_pipeline("demo", {"ingest": {"rateLimit": None}})
        await eventually(lambda: (obj(cluster.k, STATEFULSETS, "demo-ingest") or {})
                         .get("spec", {}).get("replicas") == 3, what="replicas patched")
        await eventually(lambda: cluster.status("demo").get("observedGeneration") == 3,
                         what="observedGeneration 3")
    sts = obj(cluster.k, STATEFULSETS, "demo-ingest")
    assert _hash(sts) != before, "a config change must roll the ingest pods"
    assert _hash(obj(cluster.k, DEPLOYMENTS, "demo-relay")) == relay_before
    config = obj(cluster.k, CONFIGMAPS, "demo-ingest-config")
    assert config is not None and "IOTPIPE_INGEST_RATE_LIMIT" not in config["data"]
    assert cluster.status("demo")["ingest"]["desired"] == 3
    # a grown queue expands the existing PVCs (the claim template itself is immutable)
    for ordinal in (0, 1):
        pvc = obj(cluster.k, PVCS, f"queue-demo-ingest-{ordinal}")
        assert pvc is not None
        assert pvc["spec"]["resources"]["requests"]["storage"] == "2253Mi"  # 2Gi + 10%
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1127Mi", \
        "volumeClaimTemplates must not be patched (immutable)"


async def test_autoscaling_mode_switches_replace_the_autoscaler(cluster: Cluster) -> None:
    install_keda(cluster)
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["ingest"]["autoscaling"] = {"mode": "hpa", "minReplicas": 2,
                                                 "maxReplicas": 6}
    await cluster.create_pipeline(pipeline)
    async with operator(interval=30):
        hpa = await eventually(lambda: obj(cluster.k, HPAS, "demo-ingest"), what="HPA")
        assert hpa["spec"]["maxReplicas"] == 6
        sts = obj(cluster.k, STATEFULSETS, "demo-ingest")
        assert sts is not None and "replicas" not in sts["spec"], \
            "the operator must leave replicas to the autoscaler"
        assert obj(cluster.k, SCALEDOBJECTS, "demo-ingest") is None

        await cluster.patch_pipeline("demo", {"ingest": {"autoscaling": {
            "mode": "keda", "targetConnectionsPerPod": 1000}}})
        await eventually(lambda: obj(cluster.k, SCALEDOBJECTS, "demo-ingest"), what="KEDA")
        await eventually(lambda: obj(cluster.k, HPAS, "demo-ingest") is None,
                         what="HPA removed when switching to KEDA")

        await cluster.patch_pipeline("demo", {"ingest": {"autoscaling": {"mode": "hpa"}}})
        await eventually(lambda: obj(cluster.k, HPAS, "demo-ingest"), what="HPA back")
        await eventually(lambda: obj(cluster.k, SCALEDOBJECTS, "demo-ingest") is None,
                         what="ScaledObject removed when switching to HPA")

        await cluster.patch_pipeline("demo", {"ingest": {"replicas": 4,
                                                         "autoscaling": {"mode": "none"}}})
        await eventually(lambda: obj(cluster.k, HPAS, "demo-ingest") is None, what="no HPA")
        await eventually(lambda: (obj(cluster.k, STATEFULSETS, "demo-ingest") or {})
                         .get("spec", {}).get("replicas") == 4, what="fixed replicas again")
    assert obj(cluster.k, SCALEDOBJECTS, "demo-ingest") is None


async def test_missing_keda_is_reported_not_crashed(cluster: Cluster) -> None:
    pipeline = seeded(_sample("autoscaled-keda.yaml"))
    await cluster.create_pipeline(pipeline)
    async with operator(interval=0.3):
        degraded = await eventually(lambda: cluster.condition("keda-fleet", "Degraded"),
                                    what="Degraded condition")
        assert degraded["status"] == "True" and degraded["reason"] == "KedaNotInstalled"
        (event, *_) = await eventually(lambda: cluster.events("KedaNotInstalled"),
                                       what="a Warning event for the transition")
        assert event["type"] == "Warning"
        assert event["involvedObject"]["name"] == "keda-fleet"
        # the rest of the pipeline is still reconciled, ingest held at minReplicas
        sts = await eventually(lambda: obj(cluster.k, STATEFULSETS, "keda-fleet-ingest"),
                               what="ingest sts")
        assert sts["spec"]["replicas"] == 2
        assert cluster.status("keda-fleet")["phase"] == "Degraded"
        assert obj(cluster.k, HPAS, "keda-fleet-ingest") is None
        # installing KEDA later heals it on the next reconcile
        install_keda(cluster)
        await eventually(lambda: obj(cluster.k, SCALEDOBJECTS, "keda-fleet-ingest"),
                         what="ScaledObject after KEDA appears")
        await eventually(lambda: (cluster.condition("keda-fleet", "Degraded") or {})
                         .get("status") == "False", what="Degraded cleared")
        await eventually(lambda: cluster.events("AsExpected"), what="a recovery event")
    # one event per transition, not one per reconcile
    assert len(cluster.events("KedaNotInstalled")) == 1


async def _controller_pods_and_pvcs(cluster: Cluster, ordinals: list[int],
                                    pvc_ordinals: list[int]) -> None:
    """Play the StatefulSet controller: pods and queue PVCs with the template's labels."""
    labels = {"iotpipe.dev/pipeline": "demo", "iotpipe.dev/tier": "ingest"}
    for ordinal in ordinals:
        await cluster.put(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"demo-ingest-{ordinal}", "labels": labels}})
    for ordinal in pvc_ordinals:
        await cluster.put(PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                 "metadata": {"name": f"queue-demo-ingest-{ordinal}",
                                              "labels": labels},
                                 "spec": {"resources": {"requests": {"storage": "1127Mi"}}}})


async def test_scale_down_drains_the_retained_queue(cluster: Cluster) -> None:
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["ingest"]["replicas"] = 3
    await cluster.create_pipeline(pipeline)
    await _controller_pods_and_pvcs(cluster, [0, 1, 2], [0, 1, 2])
    async with operator(interval=0.3):
        await eventually(lambda: obj(cluster.k, STATEFULSETS, "demo-ingest"), what="ingest sts")
        await asyncio.sleep(0.5)
        assert names(cluster.k, JOBS) == set(), "no drain while every ordinal is in service"

        # Scale down by a spec change; the pod of ordinal 2 is still terminating at first.
        await cluster.patch_pipeline("demo", {"ingest": {"replicas": 2}})
        await eventually(lambda: (obj(cluster.k, STATEFULSETS, "demo-ingest") or {})
                         .get("spec", {}).get("replicas") == 2, what="2 replicas")
        await asyncio.sleep(0.8)
        assert names(cluster.k, JOBS) == set(), "the pod drains itself first"
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/pods/demo-ingest-2")

        job = await eventually(lambda: obj(cluster.k, JOBS, "demo-ingest-drain-2"),
                               what="drain Job for the removed ordinal")
        pod = job["spec"]["template"]["spec"]
        assert {"name": "queue", "persistentVolumeClaim": {
            "claimName": "queue-demo-ingest-2"}} in pod["volumes"]
        assert pod["containers"][0]["args"][:5] == [
            "drain", "--data-dir", "/var/lib/iotpipe/queue", "--node-id", "demo-ingest-2"]
        assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert names(cluster.k, JOBS) == {"demo-ingest-drain-2"}
        await eventually(lambda: cluster.status("demo").get("drains", {}).get("draining")
                         == [2], what="status shows the drain")

        # The Job succeeds: the drained PVC goes, then the Job.
        await cluster.patch(JOBS, "demo-ingest-drain-2", {"status": {
            "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
        await eventually(lambda: obj(cluster.k, PVCS, "queue-demo-ingest-2") is None,
                         what="drained PVC deleted")
        await eventually(lambda: obj(cluster.k, JOBS, "demo-ingest-drain-2") is None,
                         what="finished Job deleted")
        await eventually(lambda: cluster.events("QueueDrained"), what="QueueDrained event")
    assert len(cluster.events("DrainStarted")) == 1
    assert names(cluster.k, PVCS) == {"queue-demo-ingest-0", "queue-demo-ingest-1"}


async def test_scale_up_during_a_drain_cancels_it_and_keeps_the_queue(cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))  # replicas 2
    await _controller_pods_and_pvcs(cluster, [0, 1], [0, 1, 2])  # ordinal 2 left a queue
    async with operator(interval=0.3):
        await eventually(lambda: obj(cluster.k, JOBS, "demo-ingest-drain-2"), what="drain Job")
        await cluster.patch_pipeline("demo", {"ingest": {"replicas": 3}})
        await eventually(lambda: obj(cluster.k, JOBS, "demo-ingest-drain-2") is None,
                         what="drain cancelled by the scale-up")
        await asyncio.sleep(0.8)
    assert obj(cluster.k, PVCS, "queue-demo-ingest-2") is not None, \
        "the returning pod owns its queue again"
    assert names(cluster.k, JOBS) == set()


async def test_failed_drain_keeps_the_queue_and_degrades(cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    await _controller_pods_and_pvcs(cluster, [0, 1], [0, 1, 2])
    async with operator(interval=0.3):
        await eventually(lambda: obj(cluster.k, JOBS, "demo-ingest-drain-2"), what="drain Job")
        await cluster.patch(JOBS, "demo-ingest-drain-2", {"status": {
            "failed": 7, "conditions": [{"type": "Failed", "status": "True"}]}})
        degraded = await eventually(
            lambda: (c := cluster.condition("demo", "Degraded")) and c["status"] == "True"
            and c, what="Degraded DrainFailed")
        assert degraded["reason"] == "DrainFailed"
    assert obj(cluster.k, PVCS, "queue-demo-ingest-2") is not None


async def test_paused_pipeline_changes_nothing(cluster: Cluster) -> None:
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["paused"] = True
    await cluster.create_pipeline(pipeline)
    await _controller_pods_and_pvcs(cluster, [0, 1], [0, 1, 2])
    async with operator(interval=0.3):
        await eventually(lambda: cluster.status("demo").get("phase") == "Paused",
                         what="phase Paused")
        await asyncio.sleep(1.0)  # a few timer passes
        assert names(cluster.k, STATEFULSETS) == set()
        assert names(cluster.k, CONFIGMAPS) == set()
        assert names(cluster.k, JOBS) == set(), "paused: no drains either"
        progressing = cluster.condition("demo", "Progressing")
        assert progressing is not None and progressing["reason"] == "Paused"

        await cluster.patch_pipeline("demo", {"paused": False})
        await eventually(lambda: obj(cluster.k, STATEFULSETS, "demo-ingest"), what="unpaused")


async def test_timer_repairs_drift(cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    async with operator(interval=0.3):
        await eventually(lambda: obj(cluster.k, CONFIGMAPS, "demo-ingest-config"),
                         what="ingest ConfigMap")
        # wait for exactly what is acted on next: the middle StatefulSet must exist before
        # it is patched (it is created after the ingest ConfigMap)
        await eventually(lambda: obj(cluster.k, STATEFULSETS, "demo-middle"), what="middle")
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/configmaps/demo-ingest-config")
        await cluster.patch(STATEFULSETS, "demo-middle", {"spec": {"replicas": 9}})
        await eventually(lambda: obj(cluster.k, CONFIGMAPS, "demo-ingest-config"),
                         what="deleted child recreated")
        await eventually(lambda: (obj(cluster.k, STATEFULSETS, "demo-middle") or {})
                         .get("spec", {}).get("replicas") == 2, what="drifted field restored")


async def test_deletion_policy_delete_leaves_children_to_garbage_collection(
        cluster: Cluster) -> None:
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["deletionPolicy"] = "Delete"
    await cluster.create_pipeline(pipeline)
    async with operator(interval=30):
        await eventually(lambda: cluster.status("demo").get("phase"), what="status")
        finalizers = (obj(cluster.k, PIPELINES, "demo") or {})["metadata"].get("finalizers")
        assert finalizers, "kopf holds a finalizer while the timer runs"
        children_before = names(cluster.k, STATEFULSETS) | names(cluster.k, CONFIGMAPS)
        await cluster.send("DELETE",
                           f"/apis/iotpipe.dev/v1alpha1/namespaces/{NS}/iotpipelines/demo")
        await eventually(lambda: obj(cluster.k, PIPELINES, "demo") is None,
                         what="finalizer released and object gone")
        await asyncio.sleep(0.8)
    # Children are owned (the API server's garbage collector removes them); the operator
    # neither deletes them itself nor recreates anything after the deletion.
    assert names(cluster.k, STATEFULSETS) | names(cluster.k, CONFIGMAPS) == children_before
    sts = obj(cluster.k, STATEFULSETS, "demo-ingest")
    assert sts is not None and sts["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert names(cluster.k, JOBS) == set()


async def test_resume_after_operator_restart(cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    async with operator(interval=60):
        await eventually(lambda: obj(cluster.k, CONFIGMAPS, "demo-middle-config"),
                         what="middle ConfigMap")
    # While the operator is down, a child disappears.
    await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/configmaps/demo-middle-config")
    assert obj(cluster.k, CONFIGMAPS, "demo-middle-config") is None
    # A new operator instance (long timer interval: only the resume handler can fix it).
    async with operator(interval=60):
        await eventually(lambda: obj(cluster.k, CONFIGMAPS, "demo-middle-config"),
                         within=8, what="child recreated on resume")


async def test_autoscaler_scale_down_drains_too(cluster: Cluster) -> None:
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["ingest"]["autoscaling"] = {"mode": "hpa", "minReplicas": 1}
    await cluster.create_pipeline(pipeline)
    await _controller_pods_and_pvcs(cluster, [0, 1], [0, 1])
    async with operator(interval=0.3):
        await eventually(lambda: obj(cluster.k, HPAS, "demo-ingest"), what="HPA")
        # The HPA scales the StatefulSet directly (the operator leaves replicas alone) ...
        await cluster.patch(STATEFULSETS, "demo-ingest", {"spec": {"replicas": 2}})
        await asyncio.sleep(0.8)
        await cluster.patch(STATEFULSETS, "demo-ingest", {"spec": {"replicas": 1}})
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/pods/demo-ingest-1")
        # ... and the removed ordinal's queue is drained all the same.
        await eventually(lambda: obj(cluster.k, JOBS, "demo-ingest-drain-1"), what="drain Job")
        await asyncio.sleep(0.6)
        sts = obj(cluster.k, STATEFULSETS, "demo-ingest")
        assert sts is not None and sts["spec"]["replicas"] == 1, "no fight with the HPA"


async def test_cli_run_reconciles_and_stops_on_sigterm(cluster: Cluster, procs: Any,
                                                       tmp_path: Path) -> None:
    """The real entry point: ``iotpipe-operator run`` in its own process."""
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    proc = procs.start(
        [sys.executable, "-m", "iotpipe_operator.cli", "run", "--standalone",
         "--namespaces", NS, "--reconcile-interval", "1", "--liveness-endpoint", "",
         "--no-scanning"],  # KMock cannot list namespaces
        name="operator", env={"KUBECONFIG": str(tmp_path / "kubeconfig")})
    try:
        await eventually(lambda: obj(cluster.k, STATEFULSETS, "demo-ingest")
                         or proc.poll() is not None, within=30,
                         what="the CLI operator", details=lambda: procs.log("operator"))
        assert proc.poll() is None, f"operator exited early:\n{procs.log('operator')}"
        await eventually(lambda: cluster.status("demo").get("phase"), what="status")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
    assert code == 0, procs.log("operator")


async def test_service_monitor_follows_its_crd_and_the_spec(cluster: Cluster) -> None:
    monitors = "monitoring.coreos.com/v1/servicemonitors"
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["metrics"] = {"serviceMonitor": True}
    await cluster.create_pipeline(pipeline)
    async with operator(interval=0.3):
        await eventually(lambda: obj(cluster.k, STATEFULSETS, "demo-ingest"), what="ingest sts")
        await asyncio.sleep(0.6)
        assert names(cluster.k, monitors) == set(), "no ServiceMonitor without its CRD"
        cluster.k.resources[monitors] = kmock.ResourceInfo(
            kind="ServiceMonitor", singular="servicemonitor", namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"})
        monitor = await eventually(lambda: obj(cluster.k, monitors, "demo"),
                                   what="ServiceMonitor once its CRD exists")
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
        await cluster.patch_pipeline("demo", {"metrics": {"serviceMonitor": False}})
        await eventually(lambda: obj(cluster.k, monitors, "demo") is None,
                         what="ServiceMonitor removed when switched off")


# --- day-2 operations (issue 8) -----------------------------------------------------------

def _sts_replicas(cluster: Cluster, name: str = "demo-ingest") -> int | None:
    return ((obj(cluster.k, STATEFULSETS, name) or {}).get("spec") or {}).get("replicas")


async def _tier_pods(cluster: Cluster, tier: str, ordinals: list[int]) -> None:
    labels = {"iotpipe.dev/pipeline": "demo", "iotpipe.dev/tier": tier}
    for ordinal in ordinals:
        await cluster.put(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"demo-{tier}-{ordinal}", "labels": labels}})


async def _finish_drain(cluster: Cluster, ordinal: int) -> None:
    """Play the Job controller: the drain Job of ``ordinal`` succeeds."""
    await eventually(lambda: obj(cluster.k, JOBS, f"demo-ingest-drain-{ordinal}"),
                     what=f"drain Job {ordinal}")
    await cluster.patch(JOBS, f"demo-ingest-drain-{ordinal}", {"status": {
        "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}})
    await eventually(lambda: obj(cluster.k, PVCS, f"queue-demo-ingest-{ordinal}") is None,
                     what=f"queue {ordinal} drained and deleted")


async def test_scale_down_steps_one_drained_ordinal_at_a_time(cluster: Cluster) -> None:
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["ingest"]["replicas"] = 4
    await cluster.create_pipeline(pipeline)
    await _controller_pods_and_pvcs(cluster, [0, 1, 2, 3], [0, 1, 2, 3])
    async with operator(interval=0.3):
        await eventually(lambda: _sts_replicas(cluster) == 4, what="4 replicas")
        await cluster.patch_pipeline("demo", {"ingest": {"replicas": 1}})
        await eventually(lambda: _sts_replicas(cluster) == 3, what="first step: 3")
        await eventually(lambda: (cluster.condition("demo", "Progressing") or {})
                         .get("reason") == "ScalingDown", what="ScalingDown condition")
        await asyncio.sleep(1.0)  # several passes: the removed ordinal has not drained yet
        assert _sts_replicas(cluster) == 3, "never a second step before the first drained"
        # the StatefulSet controller removes pod 3; its queue is drained by a Job
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/pods/demo-ingest-3")
        await _finish_drain(cluster, 3)
        await eventually(lambda: _sts_replicas(cluster) == 2, what="second step: 2")
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/pods/demo-ingest-2")
        await _finish_drain(cluster, 2)
        await eventually(lambda: _sts_replicas(cluster) == 1, what="third step: 1")
    assert names(cluster.k, PVCS) == {"queue-demo-ingest-0", "queue-demo-ingest-1"}


async def test_autoscaling_off_steps_down_from_the_live_replicas(cluster: Cluster) -> None:
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["ingest"]["autoscaling"] = {"mode": "hpa", "minReplicas": 2,
                                                 "maxReplicas": 8}
    await cluster.create_pipeline(pipeline)
    await _controller_pods_and_pvcs(cluster, list(range(6)), list(range(6)))
    async with operator(interval=0.3):
        await eventually(lambda: obj(cluster.k, HPAS, "demo-ingest"), what="HPA")
        await cluster.patch(STATEFULSETS, "demo-ingest", {"spec": {"replicas": 6}})  # the HPA
        await asyncio.sleep(0.8)
        assert _sts_replicas(cluster) == 6, "the operator leaves the autoscaler's replicas"
        await cluster.patch_pipeline("demo", {"ingest": {"replicas": 2,
                                                         "autoscaling": {"mode": "none"}}})
        await eventually(lambda: obj(cluster.k, HPAS, "demo-ingest") is None, what="no HPA")
        await eventually(lambda: _sts_replicas(cluster) == 5, what="one step from 6")
        await asyncio.sleep(1.0)
        assert _sts_replicas(cluster) == 5, "not 2 at once: every removed pod drains in turn"


async def test_switching_to_an_autoscaler_keeps_the_live_replicas(cluster: Cluster) -> None:
    """SSA: replicas owned by the operator must not be dropped (the StatefulSet would
    default to 1) until the autoscaler writes it."""
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["ingest"]["replicas"] = 3
    await cluster.create_pipeline(pipeline)
    async with operator(interval=0.3):
        await eventually(lambda: _sts_replicas(cluster) == 3, what="3 replicas")
        await cluster.patch_pipeline("demo", {"ingest": {"autoscaling": {
            "mode": "hpa", "minReplicas": 2, "maxReplicas": 9}}})
        await eventually(lambda: obj(cluster.k, HPAS, "demo-ingest"), what="HPA")
        await asyncio.sleep(1.0)
        assert _sts_replicas(cluster) == 3
        # The HPA writes its value whenever the live one differs (as its control loop
        # does); once the write takes the field over, the operator leaves it alone.
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            sts = obj(cluster.k, STATEFULSETS, "demo-ingest") or {}
            if sts.get("spec", {}).get("replicas") != 5:
                await cluster.patch(STATEFULSETS, "demo-ingest", {"spec": {"replicas": 5}})
            elif not stepping.manages_replicas(sts):
                break
            assert asyncio.get_running_loop().time() < deadline, "the HPA never took over"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # several operator passes
        assert _sts_replicas(cluster) == 5, "the autoscaler's value is left alone"


async def test_keda_discovery_503_never_reduces_replicas(cluster: Cluster) -> None:
    install_keda(cluster)
    pipeline = seeded(_sample("autoscaled-keda.yaml"))
    await cluster.create_pipeline(pipeline)
    async with operator(interval=0.3):
        await eventually(lambda: obj(cluster.k, SCALEDOBJECTS, "keda-fleet-ingest"),
                         what="ScaledObject")
        await cluster.patch(STATEFULSETS, "keda-fleet-ingest", {"spec": {"replicas": 7}})
        cluster.k.unavailable.add("/apis/keda.sh/v1alpha1")  # KEDA's API server hiccups
        await asyncio.sleep(1.5)  # several passes with discovery failing
        assert _sts_replicas(cluster, "keda-fleet-ingest") == 7
        assert obj(cluster.k, SCALEDOBJECTS, "keda-fleet-ingest") is not None
    # A fresh operator that never saw KEDA answer: unknown, still no scale-down.
    async with operator(interval=0.3):
        degraded = await eventually(
            lambda: (c := cluster.condition("keda-fleet", "Degraded")) and
            c["reason"] == "DiscoveryFailed" and c, what="DiscoveryFailed condition")
        assert "live replicas" in degraded["message"]
        await asyncio.sleep(1.0)
        assert _sts_replicas(cluster, "keda-fleet-ingest") == 7
        assert obj(cluster.k, SCALEDOBJECTS, "keda-fleet-ingest") is not None


async def test_removed_spec_fields_disappear_from_live_objects(cluster: Cluster) -> None:
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["imagePullSecrets"] = ["registry-creds"]
    pipeline["spec"]["ingest"]["service"] = {"annotations": {"lb.example/internal": "true"}}
    await cluster.create_pipeline(pipeline)
    async with operator(interval=30):
        sts = await eventually(lambda: obj(cluster.k, STATEFULSETS, "demo-ingest"),
                               what="ingest sts")
        assert sts["spec"]["template"]["spec"]["imagePullSecrets"] == [
            {"name": "registry-creds"}]
        await eventually(lambda: (obj(cluster.k, SERVICES, "demo-ingest") or {})
                         .get("metadata", {}).get("annotations"), what="annotations")
        await cluster.patch_pipeline("demo", {"imagePullSecrets": None,
                                              "ingest": {"service": {"annotations": None}}})
        await eventually(lambda: "imagePullSecrets" not in (
            obj(cluster.k, STATEFULSETS, "demo-ingest") or {})["spec"]["template"]["spec"],
            what="imagePullSecrets gone from the live StatefulSet")
        await eventually(lambda: "annotations" not in (
            obj(cluster.k, SERVICES, "demo-ingest") or {})["metadata"],
            what="annotations gone from the live Service")


async def test_a_foreign_object_with_a_child_name_is_refused(cluster: Cluster) -> None:
    await cluster.put(SERVICES, {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "demo-ingest", "labels": {"team": "someone-else"}},
        "spec": {"ports": [{"port": 80}]}})
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    async with operator(interval=0.3):
        degraded = await eventually(
            lambda: (c := cluster.condition("demo", "Degraded")) and
            c["reason"] == "ForeignObject" and c, what="ForeignObject condition")
        assert "Service/demo-ingest" in degraded["message"]
        await eventually(lambda: obj(cluster.k, STATEFULSETS, "demo-ingest"),
                         what="the other children are still built")
        await asyncio.sleep(0.6)
    foreign = obj(cluster.k, SERVICES, "demo-ingest")
    assert foreign is not None and "ownerReferences" not in foreign["metadata"], "not adopted"
    assert foreign["spec"]["ports"] == [{"port": 80}], "not overwritten"
    assert cluster.status("demo").get("observedGeneration") is None, \
        "a generation not fully applied is not claimed"


MIDDLE_METRICS = """# TYPE iotpipe_middle_feed_lag_records gauge
iotpipe_middle_feed_lag_records{{group="storage"}} {lag}
# TYPE iotpipe_middle_log_tail_seq gauge
iotpipe_middle_log_tail_seq 1200
"""
STORAGE_METRICS = """# TYPE iotpipe_storage_in_flight_records gauge
iotpipe_storage_in_flight_records{{endpoint="tcp://demo-middle-0"}} {in_flight}
"""


async def test_delete_with_drain_waits_for_every_queue(cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))  # Drain by default
    await _controller_pods_and_pvcs(cluster, [0, 1], [0, 1])
    await _tier_pods(cluster, "middle", [0, 1])
    await _tier_pods(cluster, "storage", [0])
    cluster.k.metrics.update({"demo-middle-0": MIDDLE_METRICS.format(lag=0),
                              "demo-middle-1": MIDDLE_METRICS.format(lag=40),
                              "demo-storage-0": STORAGE_METRICS.format(in_flight=3)})

    def deleting() -> str | None:
        condition = cluster.condition("demo", "Deleting")
        return condition["reason"] if condition else None

    async with operator(interval=0.3):
        await eventually(lambda: _sts_replicas(cluster) == 2, what="running")
        await cluster.send("DELETE",
                           f"/apis/iotpipe.dev/v1alpha1/namespaces/{NS}/iotpipelines/demo")
        await eventually(lambda: _sts_replicas(cluster) == 1, what="ingest steps to 1")
        await eventually(lambda: deleting() == "DrainingIngest", what="Deleting condition")
        await asyncio.sleep(0.8)
        assert _sts_replicas(cluster) == 1, "no second step while ordinal 1 still drains"
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/pods/demo-ingest-1")
        await _finish_drain(cluster, 1)
        await eventually(lambda: _sts_replicas(cluster) == 0, what="ingest steps to 0")
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/pods/demo-ingest-0")
        await _finish_drain(cluster, 0)
        await eventually(lambda: deleting() == "WaitingForStorage", what="waiting for storage")
        message = cluster.condition("demo", "Deleting")["message"]
        assert "40 record(s)" in message and "3 in flight" in message
        cluster.k.metrics["demo-middle-1"] = MIDDLE_METRICS.format(lag=0)
        del cluster.k.metrics["demo-storage-0"]  # unreadable is never "empty"
        await eventually(lambda: deleting() == "WaitingForMetrics", what="unreadable storage")
        assert obj(cluster.k, PIPELINES, "demo") is not None, "the finalizer still holds"
        cluster.k.metrics["demo-storage-0"] = STORAGE_METRICS.format(in_flight=0)
        await eventually(lambda: obj(cluster.k, PIPELINES, "demo") is None,
                         what="finalizer released once everything is empty")
    for reason in ("DrainingIngest", "WaitingForStorage", "Drained"):
        assert cluster.events(reason), f"an event for {reason}"


async def test_delete_with_retain_says_how_to_resume(cluster: Cluster) -> None:
    pipeline = seeded(_sample("minimal.yaml"))
    pipeline["spec"]["deletionPolicy"] = "Retain"
    await cluster.create_pipeline(pipeline)
    await _controller_pods_and_pvcs(cluster, [0, 1], [0, 1])
    async with operator(interval=0.3):
        await eventually(lambda: _sts_replicas(cluster) == 2, what="running")
        await cluster.send("DELETE",
                           f"/apis/iotpipe.dev/v1alpha1/namespaces/{NS}/iotpipelines/demo")
        await eventually(lambda: obj(cluster.k, PIPELINES, "demo") is None, what="released")
        (event,) = await eventually(lambda: cluster.events("Retained"), what="Retained event")
    assert "Recreate IoTPipeline demo in iot" in event["message"]
    assert names(cluster.k, PVCS) == {"queue-demo-ingest-0", "queue-demo-ingest-1"}
    assert _sts_replicas(cluster) == 2, "Retain does not drain"


async def test_middle_scale_up_reaches_tiers_through_the_configmap_only(
        cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    async with operator(interval=30):
        await eventually(lambda: obj(cluster.k, CONFIGMAPS, "demo-endpoints"), what="endpoints")
        templates = {}
        for kind, name in [(STATEFULSETS, "demo-ingest"), (STATEFULSETS, "demo-storage"),
                           (DEPLOYMENTS, "demo-relay")]:
            # wait for each workload read next (they are created one after another)
            templates[name] = (await eventually(
                lambda kind=kind, name=name: obj(cluster.k, kind, name), what=name)
            )["spec"]["template"]
        await cluster.patch_pipeline("demo", {"middle": {"replicas": 3}})
        await eventually(lambda: _sts_replicas(cluster, "demo-middle") == 3, what="middle 3")
        await eventually(lambda: "demo-middle-2.demo-middle.iot.svc:5557" in (
            obj(cluster.k, CONFIGMAPS, "demo-endpoints") or {}).get("data", {}).get("feed", ""),
            what="the new middle pod in the endpoints ConfigMap")
        await eventually(lambda: cluster.status("demo").get("observedGeneration") == 2,
                         what="generation 2 applied")
    for kind, name in [(STATEFULSETS, "demo-ingest"), (STATEFULSETS, "demo-storage"),
                       (DEPLOYMENTS, "demo-relay")]:
        assert (obj(cluster.k, kind, name) or {})["spec"]["template"] == templates[name], \
            f"{name} must not roll"


async def test_drain_deletion_survives_an_operator_restart(cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    await _controller_pods_and_pvcs(cluster, [0, 1], [0, 1])
    await _tier_pods(cluster, "middle", [0, 1])
    await _tier_pods(cluster, "storage", [0])
    cluster.k.metrics.update({"demo-middle-0": MIDDLE_METRICS.format(lag=0),
                              "demo-middle-1": MIDDLE_METRICS.format(lag=0),
                              "demo-storage-0": STORAGE_METRICS.format(in_flight=0)})
    async with operator(interval=0.3):
        await eventually(lambda: _sts_replicas(cluster) == 2, what="running")
        await cluster.send("DELETE",
                           f"/apis/iotpipe.dev/v1alpha1/namespaces/{NS}/iotpipelines/demo")
        await eventually(lambda: _sts_replicas(cluster) == 1, what="first step")
    # The operator is gone mid-drain; the pod of ordinal 1 exits meanwhile.
    await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/pods/demo-ingest-1")
    assert obj(cluster.k, PIPELINES, "demo") is not None, "the finalizer holds"
    async with operator(interval=0.3):  # a new instance resumes the deletion
        await _finish_drain(cluster, 1)
        await eventually(lambda: _sts_replicas(cluster) == 0, what="second step")
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/pods/demo-ingest-0")
        await _finish_drain(cluster, 0)
        await eventually(lambda: obj(cluster.k, PIPELINES, "demo") is None,
                         what="released after the drain completed")


async def test_a_foreign_statefulset_is_never_scaled_or_drained(cluster: Cluster) -> None:
    await cluster.put(STATEFULSETS, {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                     "metadata": {"name": "demo-ingest"},
                                     "spec": {"replicas": 5, "serviceName": "other"}})
    await _controller_pods_and_pvcs(cluster, [], [0, 1, 7])  # labelled queues, no pods
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    async with operator(interval=0.3):
        degraded = await eventually(
            lambda: (c := cluster.condition("demo", "Degraded")) and
            c["reason"] == "ForeignObject" and c, what="ForeignObject condition")
        assert "StatefulSet/demo-ingest" in degraded["message"]
        await asyncio.sleep(1.0)  # several passes
    sts = obj(cluster.k, STATEFULSETS, "demo-ingest")
    assert sts is not None and sts["spec"]["replicas"] == 5
    assert "ownerReferences" not in sts["metadata"]
    assert names(cluster.k, JOBS) == set(), "no drain against a foreign StatefulSet"


SECRETS = "v1/secrets"


async def _reconciled_again(cluster: Cluster) -> None:
    """Wait for one more full reconcile pass: delete an applied child and wait until a
    pass has recreated it (the create-once objects are handled earlier in that pass)."""
    # The Secret is created before the applied children: the first pass may not be there.
    await eventually(lambda: obj(cluster.k, CONFIGMAPS, "demo-ingest-config"),
                     what="the first pass applied")
    await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/configmaps/demo-ingest-config")
    await eventually(lambda: obj(cluster.k, CONFIGMAPS, "demo-ingest-config"),
                     what="a later reconcile pass")


async def test_curve_secret_is_generated_once_and_never_overwritten(
        cluster: Cluster, tmp_path: Path) -> None:
    import base64

    from iotpipe import curve

    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    async with operator(interval=0.3):
        secret = await eventually(lambda: obj(cluster.k, SECRETS, "demo-curve"),
                                  what="curve Secret")
        (owner,) = secret["metadata"]["ownerReferences"]
        assert owner["kind"] == "IoTPipeline" and owner["uid"] == "uid-1"
        files = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        assert set(files) == {f"{r}.{ext}" for r in curve.ROLES for ext in ("key", "key_secret")}
        # real keys every tier can load, the way the mounted volume presents them
        for name, content in files.items():
            (tmp_path / name).write_bytes(content)
        for role in curve.ROLES:
            assert curve.load_keys(tmp_path, role).role == role
        first = dict(secret["data"])
        await _reconciled_again(cluster)
        assert obj(cluster.k, SECRETS, "demo-curve")["data"] == first, "regenerated"
        # a user's rotation step (iotpipe keys next, applied to the Secret) is kept
        rotated = {**first, "ingest.next.key": first["ingest.key"]}
        await cluster.patch(SECRETS, "demo-curve", {"data": {"ingest.next.key":
                                                              first["ingest.key"]}})
        await cluster.patch_pipeline("demo", {"relay": {"replicas": 2}})
        await eventually(lambda: (obj(cluster.k, DEPLOYMENTS, "demo-relay") or {})
                         .get("spec", {}).get("replicas") == 2, what="the spec change applied")
        await _reconciled_again(cluster)
        assert obj(cluster.k, SECRETS, "demo-curve")["data"] == rotated
    sts = obj(cluster.k, STATEFULSETS, "demo-middle")
    volumes = sts["spec"]["template"]["spec"]["volumes"]
    assert {"name": "curve", "secret": {"secretName": "demo-curve", "defaultMode": 0o440}} \
        in volumes


async def test_a_deleted_curve_secret_is_created_again_and_disabled_curve_makes_none(
        cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    async with operator(interval=0.3):
        first = await eventually(lambda: obj(cluster.k, SECRETS, "demo-curve"),
                                 what="curve Secret")
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/secrets/demo-curve")
        again = await eventually(lambda: obj(cluster.k, SECRETS, "demo-curve"),
                                 what="curve Secret recreated")
        assert again["data"] != first["data"]  # fresh keys: the old ones are gone
    other = seeded(_sample("minimal.yaml"), uid="uid-2")
    other["metadata"]["name"] = "plain"
    other["spec"]["security"] = {"curve": {"enabled": False}}
    await cluster.create_pipeline(other)
    async with operator(interval=30):
        await eventually(lambda: cluster.status("plain").get("phase"), what="status")
        await eventually(lambda: obj(cluster.k, CONFIGMAPS, "plain-deny-list"), what="deny")
    assert obj(cluster.k, SECRETS, "plain-curve") is None
    config = obj(cluster.k, CONFIGMAPS, "plain-middle-config")
    assert "IOTPIPE_MIDDLE_CURVE_KEYS_DIR" not in config["data"]


async def test_deny_list_is_created_once_and_user_edits_survive(cluster: Cluster) -> None:
    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    async with operator(interval=0.3):
        deny = await eventually(lambda: obj(cluster.k, CONFIGMAPS, "demo-deny-list"),
                                what="deny list")
        assert yaml.safe_load(deny["data"]["deny.yaml"]) == {
            "devices": [], "clients": [], "token_ids": []}
        (owner,) = deny["metadata"]["ownerReferences"]
        assert owner["uid"] == "uid-1"
        edited = "devices: [dev-17]\nclients: []\ntoken_ids: [398c69de]\n"
        await cluster.patch(CONFIGMAPS, "demo-deny-list", {"data": {"deny.yaml": edited}})
        await cluster.patch_pipeline("demo", {"relay": {"clientQueue": 50}})
        await eventually(lambda: (obj(cluster.k, CONFIGMAPS, "demo-relay-config") or {})
                         .get("data", {}).get("IOTPIPE_RELAY_CLIENT_QUEUE") == "50",
                         what="the spec change applied")
        await _reconciled_again(cluster)
        assert obj(cluster.k, CONFIGMAPS, "demo-deny-list")["data"] == {"deny.yaml": edited}
        # deleted: made again (pods mount it), empty
        await cluster.send("DELETE", f"/api/v1/namespaces/{NS}/configmaps/demo-deny-list")
        again = await eventually(lambda: obj(cluster.k, CONFIGMAPS, "demo-deny-list"),
                                 what="deny list recreated")
        assert yaml.safe_load(again["data"]["deny.yaml"])["devices"] == []


class RotationControllers:
    """Plays kubelet and the workload controllers for a key rotation: middle pods whose
    metrics follow the Secret once ``propagate`` is set, and workloads that roll (the
    middle then runs the key its mounted Secret holds) when their template changes."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.propagate = False
        self.mounted: dict[str, bytes] = {}
        self.running: str | None = None
        self.rolled: dict[str, str] = {}  # workload -> annotation rolled out

    def files(self) -> dict[str, bytes]:
        import base64
        secret = obj(self.cluster.k, SECRETS, "demo-curve") or {}
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def metrics(self) -> str:
        from iotpipe_operator.rotation import DOMAIN_OF, public_fingerprints
        current = public_fingerprints(self.mounted, "current")
        nxt = public_fingerprints(self.mounted, "next")
        lines = [f'iotpipe_middle_curve_admitted_key{{socket="{domain}",fingerprint="{fp}"}} 1'
                 for role, domain in DOMAIN_OF.items()
                 for fp in {current.get(role), nxt.get(role)} if fp]
        lines.append(f'iotpipe_middle_curve_own_key{{fingerprint="{self.running}"}} 1')
        lines.append(f'iotpipe_middle_curve_disk_key{{fingerprint="{current["middle"]}"}} 1')
        return "\n".join(lines) + "\n"

    async def run(self) -> None:
        from iotpipe_operator.rotation import ANNOTATION, public_fingerprints
        while True:
            if self.propagate or not self.mounted:
                self.mounted = self.files()
            if self.mounted and self.running is None:
                self.running = public_fingerprints(self.mounted, "current").get("middle")
            if self.running is not None:
                for pod in ("demo-middle-0", "demo-middle-1"):
                    self.cluster.k.metrics[pod] = self.metrics()
            for resource, name in [(STATEFULSETS, "demo-middle"), (STATEFULSETS, "demo-ingest"),
                                   (STATEFULSETS, "demo-storage"), (DEPLOYMENTS, "demo-relay")]:
                live = obj(self.cluster.k, resource, name)
                if live is None:
                    continue
                annotation = ((live["spec"]["template"].get("metadata") or {})
                              .get("annotations") or {}).get(ANNOTATION)
                if annotation is None or self.rolled.get(name) == annotation:
                    continue
                if name == "demo-middle":  # restarted pods read the Secret as mounted
                    self.running = public_fingerprints(self.mounted, "current")["middle"]
                replicas = live["spec"].get("replicas", 1)
                await self.cluster.patch(resource, name, {"status": {
                    "observedGeneration": live["metadata"]["generation"],
                    "replicas": replicas, "readyReplicas": replicas,
                    "updatedReplicas": replicas, "availableReplicas": replicas,
                    "currentRevision": "r", "updateRevision": "r"}})
                self.rolled[name] = annotation
            await asyncio.sleep(0.1)


async def test_operator_rotates_the_curve_keys_step_by_step(cluster: Cluster) -> None:
    from iotpipe_operator.rotation import ANNOTATION, CONDITION, ROLES, public_fingerprints

    await cluster.create_pipeline(seeded(_sample("minimal.yaml")))
    labels = {"iotpipe.dev/pipeline": "demo", "iotpipe.dev/tier": "middle"}
    for ordinal in (0, 1):
        await cluster.put(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"demo-middle-{ordinal}", "labels": labels}})
    controllers = RotationControllers(cluster)
    task = asyncio.create_task(controllers.run())

    def reason() -> str | None:
        return (cluster.condition("demo", CONDITION) or {}).get("reason")

    try:
        async with operator(interval=0.3):
            await eventually(lambda: reason() == "Idle", what="idle rotation condition")
            original = public_fingerprints(controllers.files(), "current")
            await cluster.patch_pipeline("demo", {"security": {"curve": {"rotation": "r1"}}})
            # Step 1 done; the middles have not seen the next keys: nothing is promoted.
            await eventually(lambda: reason() == "WaitingForMiddleAdmission",
                             what="waiting for admission")
            nxt = public_fingerprints(controllers.files(), "next")
            assert set(nxt) == set(ROLES)
            assert public_fingerprints(controllers.files(), "current") == original
        # The operator restarts in the middle of the rotation; a second request arrives.
        await cluster.patch_pipeline("demo", {"security": {"curve": {"rotation": "r2"}}})
        async with operator(interval=0.3):
            await eventually(lambda: "'r2' starts after this one"
                             in (cluster.condition("demo", CONDITION) or {}).get("message", ""),
                             what="the second request waits")
            assert public_fingerprints(controllers.files(), "next") == nxt  # not regenerated
            assert cluster.status("demo")["curveRotation"]["active"] == "r1"
            controllers.propagate = True  # kubelet delivers the Secret to the middles
            await eventually(lambda: cluster.status("demo").get("curveRotation", {})
                             .get("completed") == "r1", within=60, what="r1 complete",
                             details=lambda: str(cluster.status("demo")))
            files = controllers.files()
            assert public_fingerprints(files, "current") == nxt
            for resource, name in [(STATEFULSETS, "demo-middle"), (STATEFULSETS, "demo-ingest"),
                                   (STATEFULSETS, "demo-storage"), (DEPLOYMENTS, "demo-relay")]:
                live = obj(cluster.k, resource, name)
                assert live["spec"]["template"]["metadata"]["annotations"][ANNOTATION] in (
                    "r1", "r2")
            # The queued request runs next, to the end.
            await eventually(lambda: cluster.status("demo").get("curveRotation", {})
                             .get("completed") == "r2", within=60, what="r2 complete")
            await eventually(lambda: reason() == "Idle", what="idle again")
            await _reconciled_again(cluster)
            final = controllers.files()
            assert cluster.condition("demo", "Degraded")["status"] == "False", \
                cluster.condition("demo", "Degraded")
        assert public_fingerprints(final, "next") == {}
        current = public_fingerprints(final, "current")
        assert all(current[r] not in (original[r], nxt[r]) for r in ROLES)
        assert controllers.running == current["middle"]
        assert all(controllers.rolled[w] == "r2" for w in
                   ("demo-middle", "demo-ingest", "demo-storage", "demo-relay"))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
