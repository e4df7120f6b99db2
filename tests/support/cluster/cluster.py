"""The controller manager's part, the network, and the whole stand-in put together.

One asyncio task makes a pass every ``PASS_SECONDS`` over the objects in the emulator:

- garbage collector: an object whose owners (by uid) are all gone is deleted; KMock
  then keeps objects that carry finalizers, with a ``deletionTimestamp``, until their
  finalizers are removed;
- StatefulSets: pods ``<name>-<i>`` in ordinal order (``OrderedReady`` waits for each to
  be ready, ``Parallel`` does not), PVCs from ``volumeClaimTemplates`` before their pod,
  ``persistentVolumeClaimRetentionPolicy`` honoured, scale-down from the highest ordinal,
  rolling updates from the highest ordinal one pod at a time (the revision is a hash of
  the pod template), status with ``readyReplicas`` and ``observedGeneration``;
- Deployments: pods owned by the Deployment (no ReplicaSet objects), surge-one rolling
  updates; Jobs: one pod at a time until one succeeds or ``backoffLimit`` is exceeded,
  with ``succeeded`` / ``failed`` and a Complete or Failed condition;
- HPAs and KEDA ScaledObjects: only what needs no metrics (replicas held in [min, max]);
- the kubelet (``kubelet.py``) for every pod; pods carry a finalizer of the kubelet, so a
  deleted pod stays ``Terminating`` until its processes are gone, as on a node;
- pvc-protection: a deleted claim goes once no pod uses it, and its directory with it;
- DNS and kube-proxy (``network.py``): hosts files for pod and Service names, and a
  proxy per ClusterIP Service port that spreads connections over ready endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.cluster import network
from support.cluster.api import PIPELINES, Api, ApiError, register_resources, write_kubeconfig
from support.cluster.kubelet import FINALIZER, Kubelet, default_bin_dir
from support.waiting import eventually

log = logging.getLogger(__name__)

PASS_SECONDS = 0.2
STS, DEPLOY, JOBS = "apps/v1/statefulsets", "apps/v1/deployments", "batch/v1/jobs"
PODS, PVCS, SERVICES = "v1/pods", "v1/persistentvolumeclaims", "v1/services"
HPAS = "autoscaling/v2/horizontalpodautoscalers"
SCALEDOBJECTS = "keda.sh/v1alpha1/scaledobjects"
REVISION = "controller-revision-hash"
PVC_PROTECTION = "kubernetes.io/pvc-protection"


def _revision(template: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


def _owned_by(obj: dict[str, Any], owner: dict[str, Any]) -> bool:
    uid = owner["metadata"]["uid"]
    return any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])


def _owner_ref(owner: dict[str, Any], kind: str, api_version: str) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def _matches(labels: dict[str, str] | None, selector: dict[str, str]) -> bool:
    return bool(selector) and all((labels or {}).get(k) == v for k, v in selector.items())


def _terminating(obj: dict[str, Any]) -> bool:
    return bool(obj["metadata"].get("deletionTimestamp"))


class LocalCluster:
    """The stand-in cluster for one namespace; use as ``async with``."""

    def __init__(self, emulator: Any, root: Path, namespace: str = "iot",
                 keda: bool = False) -> None:
        self.k = emulator
        self.ns = namespace
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        register_resources(emulator, keda=keda)
        self.api = Api(emulator, namespace)
        self.addresses = network.Addresses()
        self.kubelet = Kubelet(self.api, root, default_bin_dir(), self._hosts_for)
        self.kubeconfig = write_kubeconfig(root / "kubeconfig", str(emulator.url), namespace)
        self.service_ips: dict[str, str] = {}
        self._proxies: dict[tuple[str, int], network.ServiceProxy] = {}
        self._task: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._records: dict[str, list[str]] = {}
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_log = root / "operator.log"
        self.errors: list[str] = []
        self.passes = 0
        # what tests assert on: each StatefulSet's spec.replicas as it changed, the most
        # pods of one StatefulSet terminating at the same time, and the most of those
        # that were being removed (ordinal >= replicas) rather than rolled
        self.replicas_seen: dict[str, list[int]] = {}
        self.max_terminating: dict[str, int] = {}
        self.max_removing: dict[str, int] = {}
        self.pods_created: list[str] = []  # pod names in the order they were created
        emulator.pod_address = self._running_address

    async def __aenter__(self) -> LocalCluster:
        await self.kubelet.start()
        self._task = asyncio.create_task(self._loop())
        self._trimmer = asyncio.create_task(self._trim_request_log())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.stop_operator(signal.SIGKILL)
        for task in (self._task, self._trimmer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.kubelet.stop()
        for proxy in self._proxies.values():
            await proxy.stop()

    async def _trim_request_log(self) -> None:
        """KMock matches each request against its whole request log (quadratic over a
        test); keep only the recent ones."""
        while True:
            await asyncio.sleep(0.5)
            del self.k._requests[:-100]

    # -- the operator -------------------------------------------------------------------------

    def start_operator(self, interval: float = 1.0) -> subprocess.Popen[bytes]:
        """The real ``iotpipe-operator run`` process against this cluster."""
        assert self.operator is None or self.operator.poll() is not None
        with open(self.operator_log, "ab") as out:
            out.write(f"--- operator start {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            self.operator = subprocess.Popen(
                [sys.executable, "-m", "iotpipe_operator.cli", "run", "--standalone",
                 "--namespaces", self.ns, "--reconcile-interval", str(interval),
                 "--liveness-endpoint", "", "--no-scanning"],  # KMock lists no namespaces
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={"PATH": f"{default_bin_dir()}:/usr/bin:/bin",
                     "KUBECONFIG": str(self.kubeconfig), "HOME": str(self.root)})
        return self.operator

    def stop_operator(self, sig: int = signal.SIGTERM) -> int | None:
        proc = self.operator
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(timeout=10)

    # -- the pass -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.reconcile()
            except ApiError as exc:  # a conflict or a race with a deletion: next pass
                self.errors.append(str(exc))
            except Exception as exc:  # keep the cluster running; the test sees .errors
                log.exception("local cluster pass failed")
                self.errors.append(repr(exc))
            self.passes += 1
            await asyncio.sleep(max(0.05, PASS_SECONDS - (time.monotonic() - started)))

    async def reconcile(self) -> None:
        await self._collect_garbage()
        await self._autoscalers()
        for sts in list(self.api.items(STS)):
            await self._statefulset(sts)
        for deploy in list(self.api.items(DEPLOY)):
            await self._deployment(deploy)
        for job in list(self.api.items(JOBS)):
            await self._job(job)
        pods = list(self.api.items(PODS))
        self._update_dns(pods)
        await self.kubelet.sync(pods, self.addresses.pod)
        await self._services()
        await self._release_claims(pods)

    def _running_address(self, pod: str) -> str | None:
        container = self.kubelet.containers.get(pod)
        return container.ip if container is not None and self.kubelet.running(pod) else None

    async def _release_claims(self, pods: list[dict[str, Any]]) -> None:
        """pvc-protection: a deleted claim goes once no pod uses it; then its volume is
        reclaimed (the directory removed), as a dynamically provisioned volume with the
        default ``Delete`` reclaim policy would be."""
        in_use = {v["persistentVolumeClaim"]["claimName"] for p in pods
                  for v in p["spec"].get("volumes") or [] if "persistentVolumeClaim" in v}
        in_use |= {v.source["persistentVolumeClaim"]["claimName"]
                   for container in list(self.kubelet.containers.values())
                   for v in container.volumes if "persistentVolumeClaim" in v.source}
        claims = {c["metadata"]["name"]: c for c in self.api.items(PVCS)}
        for name, claim in claims.items():
            if _terminating(claim) and name not in in_use:
                finalizers = [f for f in claim["metadata"].get("finalizers") or []
                              if f != PVC_PROTECTION]
                await self.api.patch(PVCS, name, {"metadata": {"finalizers": finalizers}})
        volumes = self.root / "pvcs"
        if volumes.exists():
            for path in volumes.iterdir():
                if path.name not in claims and path.name not in in_use:
                    shutil.rmtree(path, ignore_errors=True)

    async def _collect_garbage(self) -> None:
        live = list(self.api.all_live())
        uids = {obj["metadata"].get("uid") for _, obj in live}
        for resource, obj in live:
            refs = obj["metadata"].get("ownerReferences") or []
            if refs and not _terminating(obj) and not any(r.get("uid") in uids for r in refs):
                await self.api.delete(resource, obj["metadata"]["name"])

    async def _autoscalers(self) -> None:
        """The part of an HPA (or KEDA's) that needs no metrics: the target's replicas are
        kept within [min, max]. What the metrics would decide, a test does by scaling the
        StatefulSet itself."""
        scalers = [(s["spec"], s["spec"].get("minReplicas", 1), s["spec"]["maxReplicas"])
                   for s in self.api.items(HPAS)]
        if self.api.served(SCALEDOBJECTS):
            scalers += [(s["spec"], s["spec"].get("minReplicaCount", 0),
                         s["spec"].get("maxReplicaCount", 100))
                        for s in self.api.items(SCALEDOBJECTS)]
        for spec, low, high in scalers:
            target = spec["scaleTargetRef"]
            if target.get("kind") != "StatefulSet":
                continue
            sts = self.api.get(STS, target["name"])
            if sts is None or _terminating(sts):
                continue
            replicas = int(sts["spec"].get("replicas", 1))
            wanted = min(max(replicas, int(low)), int(high))
            if wanted != replicas:
                await self.api.patch(STS, target["name"], {"spec": {"replicas": wanted}})

    # -- workloads ----------------------------------------------------------------------------

    def _pods_of(self, owner: dict[str, Any]) -> list[dict[str, Any]]:
        return [p for p in self.api.items(PODS) if _owned_by(p, owner)]

    def _pod_ready(self, pod: dict[str, Any]) -> bool:
        return (not _terminating(pod)) and any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (pod.get("status") or {}).get("conditions", []))

    async def _new_pod(self, owner: dict[str, Any], kind: str, api_version: str, name: str,
                       revision: str, extra_labels: dict[str, str] | None = None,
                       spec_extra: dict[str, Any] | None = None) -> None:
        template = owner["spec"]["template"]
        meta = template.get("metadata") or {}
        spec = json.loads(json.dumps(template["spec"]))
        spec.update(spec_extra or {})
        spec.setdefault("nodeName", "local")
        await self.api.create(PODS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.ns,
                         "labels": {**(meta.get("labels") or {}), REVISION: revision,
                                    **(extra_labels or {})},
                         "annotations": dict(meta.get("annotations") or {}),
                         "ownerReferences": [_owner_ref(owner, kind, api_version)],
                         "finalizers": [FINALIZER]},
            "spec": spec, "status": {"phase": "Pending"}})
        self.pods_created.append(name)

    async def _statefulset(self, sts: dict[str, Any]) -> None:
        if _terminating(sts):
            return
        spec = sts["spec"]
        name = sts["metadata"]["name"]
        replicas = int(spec.get("replicas", 1))
        seen = self.replicas_seen.setdefault(name, [])
        if not seen or seen[-1] != replicas:
            seen.append(replicas)
        revision = _revision(spec["template"])
        ordered = spec.get("podManagementPolicy", "OrderedReady") == "OrderedReady"
        retention = spec.get("persistentVolumeClaimRetentionPolicy") or {}
        pods = {p["metadata"]["name"]: p for p in self._pods_of(sts)}

        def ordinal(pod_name: str) -> int:
            return int(pod_name.rsplit("-", 1)[1])

        # Scale down: highest ordinal first (all at once under Parallel).
        extra = sorted((n for n in pods if ordinal(n) >= replicas), key=ordinal, reverse=True)
        for pod_name in extra:
            if not _terminating(pods[pod_name]):
                await self.api.delete(PODS, pod_name)
            if ordered:
                break
        if retention.get("whenScaled") == "Delete":
            for claim in spec.get("volumeClaimTemplates") or []:
                prefix = f"{claim['metadata']['name']}-{name}-"
                for pvc in self.api.names(PVCS):
                    if (pvc.startswith(prefix) and pvc[len(prefix):].isdigit()
                            and int(pvc[len(prefix):]) >= replicas
                            and f"{name}-{pvc[len(prefix):]}" not in pods):
                        await self.api.delete(PVCS, pvc)

        # Create: ordinal order; OrderedReady stops at the first pod not ready.
        for i in range(replicas):
            pod_name = f"{name}-{i}"
            pod = pods.get(pod_name)
            if pod is None:
                if not self.kubelet.gone(pod_name):
                    break  # the previous incarnation is still shutting down
                await self._claims(sts, i)
                volumes = [v for v in spec["template"]["spec"].get("volumes") or []]
                volumes += [{"name": c["metadata"]["name"], "persistentVolumeClaim": {
                    "claimName": f"{c['metadata']['name']}-{name}-{i}"}}
                    for c in spec.get("volumeClaimTemplates") or []]
                await self._new_pod(
                    sts, "StatefulSet", "apps/v1", pod_name, revision,
                    {"statefulset.kubernetes.io/pod-name": pod_name,
                     "apps.kubernetes.io/pod-index": str(i)},
                    {"hostname": pod_name, "subdomain": spec.get("serviceName", ""),
                     "volumes": volumes})
                if ordered:
                    break
            elif ordered and not self._pod_ready(pod):
                break

        # Rolling update: when every pod is in place and ready, replace the highest
        # ordinal that runs an old revision.
        current = [pods.get(f"{name}-{i}") for i in range(replicas)]
        if all(p is not None and self._pod_ready(p) for p in current) and not extra:
            stale = [p for p in current if p is not None
                     and p["metadata"]["labels"].get(REVISION) != revision]
            if stale:
                await self.api.delete(PODS, stale[-1]["metadata"]["name"])

        live = [p for p in pods.values() if not _terminating(p)]
        terminating = len(pods) - len(live)
        self.max_terminating[name] = max(self.max_terminating.get(name, 0), terminating)
        removing = sum(1 for n, p in pods.items() if _terminating(p) and ordinal(n) >= replicas)
        self.max_removing[name] = max(self.max_removing.get(name, 0), removing)
        await self._workload_status(STS, sts, live, revision, {
            "currentRevision": revision, "updateRevision": revision,
            "currentReplicas": sum(1 for p in live
                                   if p["metadata"]["labels"].get(REVISION) == revision)})

    async def _claims(self, sts: dict[str, Any], ordinal: int) -> None:
        spec = sts["spec"]
        name = sts["metadata"]["name"]
        retention = spec.get("persistentVolumeClaimRetentionPolicy") or {}
        for claim in spec.get("volumeClaimTemplates") or []:
            pvc_name = f"{claim['metadata']['name']}-{name}-{ordinal}"
            if self.api.get(PVCS, pvc_name) is not None:
                continue
            meta: dict[str, Any] = {"name": pvc_name, "namespace": self.ns,
                                    "labels": dict(claim["metadata"].get("labels") or {}),
                                    "finalizers": [PVC_PROTECTION]}
            if retention.get("whenDeleted") == "Delete":
                meta["ownerReferences"] = [_owner_ref(sts, "StatefulSet", "apps/v1")]
            await self.api.create(PVCS, {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta,
                "spec": json.loads(json.dumps(claim["spec"])),
                "status": {"phase": "Bound"}})
            self.kubelet.pvc_dir(pvc_name).mkdir(parents=True, exist_ok=True)

    async def _deployment(self, deploy: dict[str, Any]) -> None:
        if _terminating(deploy):
            return
        spec = deploy["spec"]
        name = deploy["metadata"]["name"]
        replicas = int(spec.get("replicas", 1))
        revision = _revision(spec["template"])
        pods = [p for p in self._pods_of(deploy) if not _terminating(p)]
        new = [p for p in pods if p["metadata"]["labels"].get(REVISION) == revision]
        old = [p for p in pods if p not in new]
        ready_new = [p for p in new if self._pod_ready(p)]
        if len(new) < replicas and len(pods) < replicas + 1:  # maxSurge 1
            suffix = hashlib.sha256(f"{time.monotonic_ns()}".encode()).hexdigest()[:5]
            await self._new_pod(deploy, "Deployment", "apps/v1",
                                f"{name}-{revision[:8]}-{suffix}", revision)
        if old and len(ready_new) + len(old) > replicas:  # maxUnavailable 0
            await self.api.delete(PODS, old[0]["metadata"]["name"])
        for extra in new[replicas:]:
            await self.api.delete(PODS, extra["metadata"]["name"])
        await self._workload_status(DEPLOY, deploy, pods, revision, {
            "updatedReplicas": len(new),
            "availableReplicas": sum(1 for p in pods if self._pod_ready(p))})

    async def _workload_status(self, resource: str, obj: dict[str, Any],
                               pods: list[dict[str, Any]], revision: str,
                               extra: dict[str, Any]) -> None:
        status = {"replicas": len(pods),
                  "readyReplicas": sum(1 for p in pods if self._pod_ready(p)),
                  "updatedReplicas": sum(1 for p in pods
                                         if p["metadata"]["labels"].get(REVISION) == revision),
                  "observedGeneration": obj["metadata"].get("generation", 1), **extra}
        old = obj.get("status") or {}
        if any(old.get(k) != v for k, v in status.items()):
            await self.api.patch_status(resource, obj["metadata"]["name"], status)

    async def _job(self, job: dict[str, Any]) -> None:
        if _terminating(job):
            return
        status = dict(job.get("status") or {})
        if any(c.get("status") == "True" and c.get("type") in ("Complete", "Failed")
               for c in status.get("conditions", [])):
            return
        name = job["metadata"]["name"]
        pods = sorted(self._pods_of(job), key=lambda p: p["metadata"]["name"])
        phases = [(p.get("status") or {}).get("phase") for p in pods]
        succeeded = phases.count("Succeeded")
        failed = phases.count("Failed")
        active = sum(1 for p in pods if (p.get("status") or {}).get("phase")
                     not in ("Succeeded", "Failed") and not _terminating(p))
        new_status: dict[str, Any] = {"active": active, "succeeded": succeeded,
                                      "failed": failed}
        limit = int(job["spec"].get("backoffLimit", 6))
        if succeeded:
            new_status["conditions"] = [{"type": "Complete", "status": "True"}]
            new_status["active"] = 0
        elif failed > limit:
            new_status["conditions"] = [{"type": "Failed", "status": "True",
                                         "reason": "BackoffLimitExceeded"}]
            new_status["active"] = 0
        elif active == 0:
            await self._new_pod(job, "Job", "batch/v1", f"{name}-{len(pods)}",
                                _revision(job["spec"]["template"]),
                                {"job-name": name, "batch.kubernetes.io/job-name": name})
            new_status["active"] = 1
        if any(status.get(k) != v for k, v in new_status.items()):
            await self.api.patch_status(JOBS, name, new_status)

    # -- network ------------------------------------------------------------------------------

    def _hosts_for(self, pod_name: str) -> str:
        pod = self.api.get(PODS, pod_name) or {}
        spec = pod.get("spec") or {}
        container = self.kubelet.containers.get(pod_name)
        own = None
        if container is not None and container.ip:
            names = [pod_name]
            if spec.get("subdomain"):
                names = [*network.dns_names(f"{pod_name}.{spec['subdomain']}", self.ns)[::-1],
                         pod_name]
            own = (container.ip, names)
        return network.hosts_text(self._records, own)

    def _update_dns(self, pods: list[dict[str, Any]]) -> None:
        records: dict[str, list[str]] = {}
        services = {s["metadata"]["name"]: s for s in self.api.items(SERVICES)}
        for svc_name, svc in services.items():
            spec = svc.get("spec") or {}
            headless = spec.get("clusterIP") == "None"
            not_ready_ok = bool(spec.get("publishNotReadyAddresses"))
            if headless:
                backends = [self._pod_ip(p) for p in pods
                            if _matches(p["metadata"].get("labels"), spec.get("selector") or {})
                            and self._pod_ip(p)
                            and (not_ready_ok or self._pod_ready(p))]
            else:
                backends = [self.service_ips.setdefault(svc_name, self.addresses.service())]
            for alias in network.dns_names(svc_name, self.ns):
                if backends:
                    records[alias] = [b for b in backends if b]
        for pod in pods:
            spec = pod.get("spec") or {}
            sub = spec.get("subdomain")
            ip = self._pod_ip(pod)
            if not sub or not ip or sub not in services:
                continue
            svc_spec = services[sub].get("spec") or {}
            if svc_spec.get("publishNotReadyAddresses") or self._pod_ready(pod):
                for alias in network.dns_names(f"{spec.get('hostname')}.{sub}", self.ns):
                    records[alias] = [ip]
        self._records = records
        for pod in pods:
            path = self.kubelet.hosts_file(pod["metadata"]["name"])
            if path.exists():
                network.write_in_place(path, self._hosts_for(pod["metadata"]["name"]))

    def _pod_ip(self, pod: dict[str, Any]) -> str:
        container = self.kubelet.containers.get(pod["metadata"]["name"])
        return container.ip if container is not None else ""

    def endpoints(self, service: str, port: Any) -> list[tuple[str, int]]:
        """Ready, non-terminating pods behind ``service`` with the target port resolved."""
        svc = self.api.get(SERVICES, service)
        if svc is None:
            return []
        out = []
        for pod in self.api.items(PODS):
            if not (_matches(pod["metadata"].get("labels"), svc["spec"].get("selector") or {})
                    and self._pod_ready(pod) and self.kubelet.ready(pod["metadata"]["name"])):
                continue
            target = port
            if isinstance(port, str):
                target = next((p["containerPort"] for c in pod["spec"]["containers"]
                               for p in c.get("ports", []) if p.get("name") == port), None)
            if target is not None:
                out.append((self._pod_ip(pod), int(target)))
        return out

    async def _services(self) -> None:
        """A proxy per port of every ClusterIP Service (started once, kept until teardown;
        it looks its endpoints up on every connection)."""
        for svc in list(self.api.items(SERVICES)):
            spec = svc.get("spec") or {}
            if spec.get("clusterIP") == "None" or not spec.get("selector"):
                continue
            name = svc["metadata"]["name"]
            ip = self.service_ips.setdefault(name, self.addresses.service())
            for port in spec.get("ports") or []:
                key = (name, int(port["port"]))
                if key in self._proxies:
                    continue
                target = port.get("targetPort", port["port"])
                proxy = network.ServiceProxy(
                    ip, int(port["port"]),
                    lambda n=name, t=target: self.endpoints(n, t))  # type: ignore[misc]
                await proxy.start()
                self._proxies[key] = proxy

    # -- conveniences for tests ---------------------------------------------------------------

    def signal_pod(self, pod: str, sig: int) -> None:
        """Send ``sig`` to a pod's process group, as a crash or a frozen node would."""
        container = self.kubelet.containers[pod]
        assert container.proc is not None and container.proc.poll() is None, pod
        os.killpg(container.proc.pid, sig)

    def install_keda(self) -> None:
        """Serve KEDA's ScaledObject API (its CRD installed)."""
        register_resources(self.k, keda=True)

    def url(self, service: str, port: int, path: str = "", scheme: str = "ws") -> str:
        return f"{scheme}://{self.service_ips[service]}:{port}{path}"

    def pvc_dir(self, claim: str) -> Path:
        return self.kubelet.pvc_dir(claim)

    def pod_log(self, pod: str) -> str:
        path = self.kubelet.pod_dir(pod) / "container.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 3000) -> str:
        """The operator's log and every pod's, for assertion messages."""
        parts = [f"== operator\n{self.operator_log.read_text(errors='replace')[-tail:]}"
                 if self.operator_log.exists() else "== operator: no log"]
        pods_dir = self.root / "pods"
        if pods_dir.exists():
            for pod in sorted(pods_dir.iterdir()):
                parts.append(f"== pod {pod.name}\n{self.pod_log(pod.name)[-tail:]}")
        if self.errors:
            parts.append("== cluster errors\n" + "\n".join(self.errors[-20:]))
        return "\n".join(parts)

    async def create_pipeline(self, pipeline: dict[str, Any]) -> None:
        pipeline["metadata"]["namespace"] = self.ns
        await self.api.create(PIPELINES, pipeline)

    async def patch_pipeline(self, name: str, spec_patch: dict[str, Any]) -> None:
        await self.api.send("PATCH", self.api.path(PIPELINES, name), {"spec": spec_patch})

    def pipeline(self, name: str) -> dict[str, Any]:
        return self.api.get(PIPELINES, name) or {}

    def condition(self, name: str, kind: str) -> dict[str, Any] | None:
        status = self.pipeline(name).get("status") or {}
        return next((c for c in status.get("conditions", []) if c["type"] == kind), None)

    def ready_pods(self, prefix: str) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self.api.items(PODS)
                      if p["metadata"]["name"].startswith(prefix) and self._pod_ready(p))

    def pod_names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.api.names(PODS) if n.startswith(prefix))

    async def wait(self, check: Callable[[], Any], within: float, what: str) -> Any:
        """Poll ``check`` until it is truthy (bounded); fail with every log on timeout."""
        def operator_failed() -> str | None:
            code = None if self.operator is None else self.operator.poll()
            return None if code in (None, 0, -9) else f"operator exited {code}"

        return await eventually(check, within, what, interval=0.2, abort=operator_failed,
                                details=self.logs)
