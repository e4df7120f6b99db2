"""The stand-in itself does what the controller manager and the kubelet would.

A tiny HTTP server (from a ConfigMap volume) plays the container; it reports what it sees
inside its pod: hostname, environment, name resolution, mounted files. (Container paths
reach it through its command and environment, which the kubelet maps to the pod's
directories; a path written inside a file is not mapped.)
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.cluster import ClusterEmulator, LocalCluster
from support.cluster.kubelet import FINALIZER

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90),
              pytest.mark.kmock(cls=ClusterEmulator)]

SERVER = """\
import http.server, json, os, signal, socket, sys
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, lambda *_: print("TERM ignored", flush=True))
else:
    signal.signal(signal.SIGTERM, lambda *_: (print("TERM", flush=True), sys.exit(0)))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path in ("/ready", "/alive"):
            flag = {"/ready": "/not-ready", "/alive": "/dead"}[self.path]
            ok = os.path.exists(os.environ["DATA"] + flag) is False
            self.send_response(200 if ok else 503); self.end_headers(); return
        def resolve(name):
            try:
                return socket.gethostbyname(name)
            except OSError:
                return None
        body = json.dumps({
            "hostname": socket.gethostname(), "pid": os.getpid(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(("X_", "IOTPIPE_"))},
            "peer": resolve(os.environ["PEER"]), "service": resolve("web.iot.svc"),
            "motd": open(os.environ["X_MOTD"]).read(),
            "data": os.environ["DATA"],
        }).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer((os.environ["IOTPIPE_WEB_HOST"], 8000), Handler)
print("serving", flush=True)
server.serve_forever()
"""


def _container(**extra: Any) -> dict[str, Any]:
    return {"name": "web", "command": ["python3", "/app/server.py"],
            "ports": [{"name": "http", "containerPort": 8000}],
            "envFrom": [{"configMapRef": {"name": "web-env"}}],
            "env": [{"name": "X_POD", "valueFrom": {"fieldRef": {
                        "fieldPath": "metadata.name"}}},
                    {"name": "X_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "X_TOKEN", "valueFrom": {"secretKeyRef": {
                        "name": "web-secret", "key": "token"}}},
                    {"name": "X_REF", "value": "pod $(X_POD)"},
                    {"name": "DATA", "value": "/data"},
                    {"name": "X_MOTD", "value": "/etc/web/motd"}, *extra.pop("env", [])],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"},
                               "periodSeconds": 1, "failureThreshold": 1},
            "volumeMounts": [{"name": "app", "mountPath": "/app"},
                             {"name": "motd", "mountPath": "/etc/web"},
                             {"name": "data", "mountPath": "/data"}], **extra}


async def _seed(cluster: LocalCluster) -> None:
    api = cluster.api
    await api.create("v1/configmaps", {"metadata": {"name": "web-app"},
                                       "data": {"server.py": SERVER}})
    await api.create("v1/configmaps", {"metadata": {"name": "web-env"},
                                       "data": {"X_FROM_ENVFROM": "yes", "PEER": "web-1.web",
                                                "IOTPIPE_WEB_HOST": "0.0.0.0"}})
    await api.create("v1/configmaps", {"metadata": {"name": "web-motd"},
                                       "data": {"motd": "hello"}})
    await api.create("v1/secrets", {"metadata": {"name": "web-secret"},
                                    "data": {"token": base64.b64encode(b"s3cret").decode()}})
    await api.create("v1/services", {"metadata": {"name": "web"}, "spec": {
        "clusterIP": "None", "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 8000}]}})
    await api.create("v1/services", {"metadata": {"name": "web-lb"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}})


def _statefulset(replicas: int, **pod_spec: Any) -> dict[str, Any]:
    container = _container(**pod_spec.pop("container", {}))
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
            "spec": {"replicas": replicas, "serviceName": "web",
                     "selector": {"matchLabels": {"app": "web"}},
                     "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete",
                                                              "whenDeleted": "Retain"},
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                         "containers": [container],
                         "volumes": [{"name": "app", "configMap": {"name": "web-app"}},
                                     {"name": "motd", "configMap": {"name": "web-motd"}}],
                         **pod_spec}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                         "accessModes": ["ReadWriteOnce"],
                         "resources": {"requests": {"storage": "1Mi"}}}}]}}


def _info(address: str, port: int = 8000) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{address}:{port}/", timeout=3) as response:
        return dict(json.loads(response.read()))


def _ip(cluster: LocalCluster, pod: str) -> str:
    return str(((cluster.api.get("v1/pods", pod) or {}).get("status") or {}).get("podIP"))


async def test_statefulset_pods_see_a_cluster(cluster: LocalCluster) -> None:
    await _seed(cluster)
    await cluster.api.create("apps/v1/statefulsets", _statefulset(2))
    sts = await cluster.wait(lambda: (s := cluster.api.get("apps/v1/statefulsets", "web"))
                             and (s.get("status") or {}).get("readyReplicas") == 2 and s,
                             30, "2 ready replicas")
    assert sts["status"]["observedGeneration"] == sts["metadata"]["generation"]
    assert cluster.pods_created == ["web-0", "web-1"], "ordinal order"
    ip0, ip1 = _ip(cluster, "web-0"), _ip(cluster, "web-1")
    assert ip0 != ip1 and ip0.startswith("127.") and ip1.startswith("127.")
    info = _info(ip0)
    assert info["hostname"] == "web-0"
    assert info["env"]["X_POD"] == "web-0" and info["env"]["X_IP"] == ip0
    assert info["env"]["X_TOKEN"] == "s3cret" and info["env"]["X_FROM_ENVFROM"] == "yes"
    assert info["env"]["X_REF"] == "pod web-0"
    assert info["env"]["IOTPIPE_WEB_HOST"] == ip0, "0.0.0.0 in a pod is the pod's address"
    assert info["peer"] == ip1, "pod DNS through the headless Service"
    assert info["service"] in (ip0, ip1)
    assert info["motd"] == "hello"
    assert Path(info["data"]) == cluster.pvc_dir("data-web-0")

    # A ClusterIP Service proxies to a ready pod (the proxy runs in this event loop).
    through = await asyncio.to_thread(_info, cluster.service_ips["web-lb"], 80)
    assert through["hostname"] in ("web-0", "web-1")

    # A ConfigMap volume follows its ConfigMap, in place, without a restart.
    await cluster.api.patch("v1/configmaps", "web-motd", {"data": {"motd": "changed"}})
    await cluster.wait(lambda: _info(ip0)["motd"] == "changed", 10, "motd updated")
    assert _info(ip0)["pid"] == info["pid"]

    # Readiness follows the probe; readyReplicas follows readiness.
    (cluster.pvc_dir("data-web-1") / "not-ready").write_text("")
    await cluster.wait(lambda: (cluster.api.get("apps/v1/statefulsets", "web") or {})
                       .get("status", {}).get("readyReplicas") == 1, 10, "readyReplicas 1")
    assert cluster.ready_pods("web-") == ["web-0"]
    (cluster.pvc_dir("data-web-1") / "not-ready").unlink()
    await cluster.wait(lambda: cluster.ready_pods("web-") == ["web-0", "web-1"], 10, "ready")

    # A PVC outlives its pod: a replacement pod finds the same data.
    (cluster.pvc_dir("data-web-0") / "kept").write_text("yes")
    await cluster.api.delete("v1/pods", "web-0")
    await cluster.wait(lambda: "web-0" in cluster.ready_pods("web-")
                       and _info(_ip(cluster, "web-0"))["pid"] != info["pid"], 20,
                       "web-0 replaced")
    assert (cluster.pvc_dir("data-web-0") / "kept").read_text() == "yes"

    # Scale-down removes the highest ordinal; whenScaled: Delete removes its claim.
    await cluster.api.patch("apps/v1/statefulsets", "web", {"spec": {"replicas": 1}})
    await cluster.wait(lambda: cluster.pod_names("web-") == ["web-0"]
                       and "data-web-1" not in cluster.api.names("v1/persistentvolumeclaims")
                       and not cluster.pvc_dir("data-web-1").exists(), 20,
                       "web-1 and its claim gone")
    assert cluster.replicas_seen["web"] == [2, 1]


async def test_deletion_runs_prestop_then_sigterm_then_sigkill(cluster: LocalCluster) -> None:
    await _seed(cluster)
    await cluster.api.create("apps/v1/statefulsets", _statefulset(
        1, terminationGracePeriodSeconds=2,
        container={"env": [{"name": "IGNORE_TERM", "value": "1"}],
                   "lifecycle": {"preStop": {"exec": {
                       "command": ["sh", "-c", "echo stopping > /data/prestop"]}}}}))
    await cluster.wait(lambda: cluster.ready_pods("web-") == ["web-0"], 30, "web-0 ready")
    proc = cluster.kubelet.containers["web-0"].proc
    assert proc is not None
    await cluster.api.delete("apps/v1/statefulsets", "web")  # orphaned pod goes by GC
    pod = await cluster.wait(lambda: (p := cluster.api.get("v1/pods", "web-0"))
                             and p["metadata"].get("deletionTimestamp") and p, 10,
                             "the pod terminating")
    assert FINALIZER in pod["metadata"]["finalizers"], "held by the kubelet while it stops"
    await cluster.wait(lambda: cluster.api.get("v1/pods", "web-0") is None, 20, "pod gone")
    assert proc.returncode == -signal.SIGKILL, "SIGTERM ignored: killed after the grace"
    assert (cluster.pvc_dir("data-web-0") / "prestop").read_text() == "stopping\n"
    assert "TERM ignored" in cluster.pod_log("web-0")
    # whenDeleted: Retain keeps the claim (and its directory)
    assert "data-web-0" in cluster.api.names("v1/persistentvolumeclaims")


async def test_a_failing_liveness_probe_restarts_the_container(cluster: LocalCluster) -> None:
    await _seed(cluster)
    await cluster.api.create("apps/v1/statefulsets", _statefulset(
        1, terminationGracePeriodSeconds=1, container={"livenessProbe": {
            "httpGet": {"path": "/alive", "port": "http"},
            "periodSeconds": 1, "failureThreshold": 2}}))
    await cluster.wait(lambda: cluster.ready_pods("web-") == ["web-0"], 30, "web-0 ready")
    first = _info(_ip(cluster, "web-0"))["pid"]
    (cluster.pvc_dir("data-web-0") / "dead").write_text("")

    def restarts() -> int:
        pod = cluster.api.get("v1/pods", "web-0") or {}
        statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
        return int(statuses[0].get("restartCount", 0))

    await cluster.wait(lambda: restarts() == 1, 20, "one restart")
    (cluster.pvc_dir("data-web-0") / "dead").unlink()
    await cluster.wait(lambda: cluster.ready_pods("web-") == ["web-0"], 20, "ready again")
    assert _info(_ip(cluster, "web-0"))["pid"] != first
    assert "liveness probe failed" in cluster.pod_log("web-0")
    assert cluster.pods_created == ["web-0"], "the same pod, its container restarted"


async def test_garbage_collection_respects_finalizers(cluster: LocalCluster) -> None:
    api = cluster.api
    owner = await api.create("v1/configmaps", {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner",
           "uid": owner["metadata"]["uid"]}
    await api.create("v1/configmaps", {"metadata": {"name": "child", "ownerReferences": [ref]}})
    await api.create("v1/secrets", {"metadata": {"name": "held", "ownerReferences": [ref],
                                                 "finalizers": ["example.com/hold"]}})
    await api.create("v1/configmaps", {"metadata": {"name": "unrelated"}})
    await api.delete("v1/configmaps", "owner")
    await cluster.wait(lambda: api.get("v1/configmaps", "child") is None, 10, "child collected")
    held = await cluster.wait(lambda: (s := api.get("v1/secrets", "held"))
                              and s["metadata"].get("deletionTimestamp") and s, 10,
                              "held child marked for deletion")
    assert held["metadata"]["finalizers"] == ["example.com/hold"]
    await api.patch("v1/secrets", "held", {"metadata": {"finalizers": []}})
    await cluster.wait(lambda: api.get("v1/secrets", "held") is None, 10, "released")
    assert api.get("v1/configmaps", "unrelated") is not None


def _job(name: str, script: str, backoff: int) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"backoffLimit": backoff, "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "job", "command": ["sh", "-c", script]}]}}}}


async def test_jobs_report_succeeded_and_failed(cluster: LocalCluster) -> None:
    api = cluster.api
    await api.create("batch/v1/jobs", _job("ok", "exit 0", 2))
    await api.create("batch/v1/jobs", _job("bad", "exit 3", 1))

    def status(name: str) -> dict[str, Any]:
        return dict((api.get("batch/v1/jobs", name) or {}).get("status") or {})

    def finished(name: str) -> str | None:
        return next((c["type"] for c in status(name).get("conditions", [])
                     if c["status"] == "True"), None)

    await cluster.wait(lambda: finished("ok") and finished("bad"), 30, "both Jobs finished")
    assert finished("ok") == "Complete" and status("ok")["succeeded"] == 1
    assert finished("bad") == "Failed" and status("bad")["failed"] == 2  # 1 + backoffLimit
    assert cluster.pod_names("bad-") == ["bad-0", "bad-1"]


async def test_teardown_kills_every_process_group_even_when_a_test_fails(
        kmock: ClusterEmulator, tmp_path: Path) -> None:
    local = LocalCluster(kmock, tmp_path / "teardown")
    groups: list[int] = []
    with pytest.raises(RuntimeError, match="a failing test"):
        async with local:
            await _seed(local)
            await local.api.create("apps/v1/statefulsets", _statefulset(
                2, container={"env": [{"name": "IGNORE_TERM", "value": "1"}]}))
            await local.wait(lambda: len(local.ready_pods("web-")) == 2, 30, "2 pods ready")
            operator = local.start_operator()
            groups = [c.proc.pid for c in local.kubelet.containers.values()
                      if c.proc is not None] + [operator.pid]
            raise RuntimeError("a failing test")
    assert len(groups) == 3
    for group in groups:
        with pytest.raises(ProcessLookupError):
            os.killpg(group, 0)
