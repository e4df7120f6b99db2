"""End to end on a kind cluster: images -> chart -> IoTPipeline -> devices -> storage.

What runs, in order (one cluster for the whole module, deleted in a finalizer):

1. ``kind create cluster`` (private kubeconfig), build both images with the host's docker
   and ``kind load docker-image`` them (no registry involved);
2. install charts/iotpipe-operator with the Helm engine (helm-python-sdk), wait for the
   operator Deployment;
3. apply samples/minimal.yaml (image pointed at the loaded workload image) with its auth
   Secret, wait for condition Ready;
4. devices speak the real device protocol (websockets, ``Authorization: Bearer`` with a
   token from ``iotpipe token``) through ``kubectl port-forward`` and every acknowledged
   message is read back from the storage pods with ``iotpipe query``;
5. scale ingest up through the IoTPipeline scale subresource, send to every ingest pod,
   scale down again (the removed pods drain) and check nothing acknowledged is missing;
6. delete a middle pod and force-delete an ingest pod in the middle of a stream, and
   check again that every acknowledged message is stored exactly once.

Requirements: ``kind``, ``kubectl`` and a working ``docker`` (the tests skip, naming what
is missing, otherwise). Knobs (environment):

- ``IOTPIPE_E2E_KIND_IMAGE``: kind node image (default: kind's own default);
- ``IOTPIPE_E2E_BASE_IMAGE``: ``BASE_IMAGE`` build argument (default python:3.11-slim-bookworm);
- ``IOTPIPE_E2E_SKIP_BUILD=1``: use already built ``ghcr.io/iotpipe/iotpipe:e2e`` and
  ``ghcr.io/iotpipe/iotpipe-operator:e2e`` instead of building them;
- ``IOTPIPE_E2E_KEEP_CLUSTER=1``: keep the cluster afterwards for debugging.

Run: ``.venv/bin/pytest tests/e2e -m e2e -v`` (about 10-15 minutes on a laptop).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.kind import (
    CHART,
    NAMESPACE,
    OPERATOR_IMAGE,
    OPERATOR_NAMESPACE,
    PIPELINE,
    RELEASE,
    REPO,
    STORE_DB,
    TAG,
    WORKLOAD_IMAGE,
    operator_name,
    pipeline_manifest,
)
from support.waiting import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


def _missing_tool() -> str | None:
    for tool in ("kind", "kubectl", "docker"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (kind e2e tests need kind, kubectl and docker)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"docker daemon not reachable: {info.stderr.strip()[:300]}"
    return None


# ---------------------------------------------------------------- cluster plumbing


@dataclass
class Cluster:
    name: str
    kubeconfig: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True,
                input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["kubectl", *args], env=self.env(), capture_output=True,
                                text=True, timeout=timeout, input=input_text)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        return result

    def get_json(self, *args: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.kubectl("get", "-o", "json", *args).stdout)
        return data

    def diagnostics(self) -> str:
        """What a failing test prints: pipeline status, pods, recent events, operator log."""
        parts = []
        for args in (["get", "iotpipelines,pods,pvc,jobs", "-n", NAMESPACE, "-o", "wide"],
                     ["describe", "iotpipeline", PIPELINE, "-n", NAMESPACE],
                     ["get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp"],
                     ["logs", "-n", OPERATOR_NAMESPACE, "deployment/" + operator_name(),
                      "--tail=80"]):
            result = self.kubectl(*args, check=False, timeout=60)
            parts.append(f"$ kubectl {' '.join(args)}\n{result.stdout[-4000:]}"
                         f"{result.stderr[-1000:]}")
        return "\n".join(parts)


def run(*args: str, timeout: float, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            env=env)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    missing = _missing_tool()
    if missing:
        pytest.skip(missing)
    name = f"iotpipe-e2e-{uuid.uuid4().hex[:6]}"
    kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
    created = Cluster(name, kubeconfig)

    def delete() -> None:
        if os.environ.get("IOTPIPE_E2E_KEEP_CLUSTER") == "1":
            print(f"\nkeeping kind cluster {name} (KUBECONFIG={kubeconfig})")
            return
        subprocess.run(["kind", "delete", "cluster", "--name", name], capture_output=True,
                       timeout=300)

    # Registered before creation: a half-created cluster is deleted too.
    request.addfinalizer(delete)
    command = ["kind", "create", "cluster", "--name", name, "--kubeconfig", str(kubeconfig),
               "--wait", "180s"]
    if os.environ.get("IOTPIPE_E2E_KIND_IMAGE"):
        command += ["--image", os.environ["IOTPIPE_E2E_KIND_IMAGE"]]
    run(*command, timeout=420)
    yield created


@pytest.fixture(scope="module")
def images(cluster: Cluster) -> list[str]:
    built = [(WORKLOAD_IMAGE, "Dockerfile.workload"), (OPERATOR_IMAGE, "Dockerfile.operator")]
    if os.environ.get("IOTPIPE_E2E_SKIP_BUILD") != "1":
        base = os.environ.get("IOTPIPE_E2E_BASE_IMAGE", "python:3.11-slim-bookworm")
        for tag, dockerfile in built:
            run("docker", "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
                "-f", str(REPO / dockerfile), "-t", tag, str(REPO), timeout=1200)
    for tag, _ in built:
        run("kind", "load", "docker-image", tag, "--name", cluster.name, timeout=600)
    return [tag for tag, _ in built]


@pytest.fixture(scope="module")
def operator(cluster: Cluster, images: list[str]) -> str:
    import helm_python as helm

    values = {"image": {"repository": OPERATOR_IMAGE.rsplit(":", 1)[0], "tag": TAG,
                        "pullPolicy": "IfNotPresent"},
              "operator": {"logLevel": "debug", "reconcileInterval": 10}}
    with helm.Config(kubeconfig_path=cluster.kubeconfig, namespace=OPERATOR_NAMESPACE) as cfg, \
            helm.Chart.load(CHART) as chart:
        cfg.install(chart, RELEASE, values, namespace=OPERATOR_NAMESPACE,
                    create_namespace=True, wait="watcher", timeout=300)
    cluster.kubectl("-n", OPERATOR_NAMESPACE, "rollout", "status",
                    f"deployment/{operator_name()}", "--timeout=300s", timeout=320)
    wait_for(lambda: cluster.kubectl(
        "wait", "--for=condition=Established", "crd/iotpipelines.iotpipe.dev",
        "--timeout=5s", check=False, timeout=30).returncode == 0, 120,
        "the IoTPipeline CRD to be established", interval=2.0, details=cluster.diagnostics)
    return operator_name()


@pytest.fixture(scope="module")
def auth_secret() -> str:
    return secrets.token_hex(32)


@pytest.fixture(scope="module")
def pipeline(cluster: Cluster, operator: str, auth_secret: str) -> dict[str, Any]:
    manifest = pipeline_manifest()
    secret_name = manifest["spec"]["ingest"]["auth"]["secretName"]
    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("-n", NAMESPACE, "create", "secret", "generic", secret_name,
                    f"--from-literal=secret={auth_secret}")
    cluster.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(manifest))
    wait_until_ready(cluster, timeout=600)
    return manifest


def wait_until_ready(cluster: Cluster, timeout: float) -> None:
    def ready() -> bool:
        result = cluster.kubectl("-n", NAMESPACE, "wait", f"iotpipeline/{PIPELINE}",
                                 "--for=condition=Ready", "--timeout=10s", check=False,
                                 timeout=30)
        return result.returncode == 0

    wait_for(ready, timeout, f"IoTPipeline {PIPELINE} to be Ready", interval=1,
             details=cluster.diagnostics)


# ---------------------------------------------------------------- devices


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PortForwardError(Exception):
    """kubectl port-forward could not start (e.g. the target pod is being replaced)."""


@contextlib.contextmanager
def port_forward(cluster: Cluster, target: str, remote_port: int) -> Iterator[int]:
    """``kubectl port-forward`` on loopback; yields the local port once it accepts."""
    local = free_local_port()
    proc = subprocess.Popen(
        ["kubectl", "-n", NAMESPACE, "port-forward", "--address", "127.0.0.1", target,
         f"{local}:{remote_port}"], env=cluster.env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode() if proc.stderr else ""
                raise PortForwardError(f"port-forward {target} exited: {stderr[-500:]}")
            with socket.socket() as sock:
                sock.settimeout(1)
                if sock.connect_ex(("127.0.0.1", local)) == 0:
                    break
            if time.monotonic() > deadline:
                raise PortForwardError(f"port-forward {target}: nothing listening after 60 s")
            time.sleep(0.5)
        yield local
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def device_token(device_id: str, secret: str) -> str:
    return run(sys.executable, "-m", "iotpipe.cli", "token", device_id, "--ttl", "3600",
               timeout=60, env={**os.environ, "IOTPIPE_AUTH_SECRET": secret}).strip()


@dataclass
class Device:
    """A device speaking the real protocol: JSON batches, wait for every id's ack."""

    device_id: str
    token: str
    acked: set[str] = field(default_factory=set)
    batch: int = 20
    errors: list[BaseException] = field(default_factory=list)

    def send(self, port: int, msg_ids: list[str], stop: threading.Event | None = None) -> None:
        """Send ``msg_ids`` in batches; return when all are acked, on ``stop``, or when the
        connection drops (what was acked stays in ``self.acked``)."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        try:
            with connect(f"ws://127.0.0.1:{port}/v1/ingest", open_timeout=30,
                         additional_headers={"Authorization": f"Bearer {self.token}"},
                         max_size=2**20) as ws:
                for start in range(0, len(msg_ids), self.batch):
                    if stop is not None and stop.is_set():
                        return
                    self._send_batch(ws, msg_ids[start:start + self.batch])
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                self.errors.append(exc)  # the token is refused: never transient
            return  # e.g. 503 while the pod is not ready yet
        except (ConnectionClosed, InvalidHandshake, EOFError, OSError, TimeoutError):
            return  # the connection dropped (or the pod is restarting): acked stays acked
        except BaseException as exc:  # a protocol violation: the test thread re-raises it
            self.errors.append(exc)

    def _send_batch(self, ws: Any, ids: list[str]) -> None:
        pending = [i for i in ids if i not in self.acked]
        deadline = time.monotonic() + 60
        while pending:
            frame = [{"id": i, "data": {"seq": int(i.rsplit("-", 1)[1]), "temp": 21.5}}
                     for i in pending]
            ws.send(json.dumps(frame))
            answered: set[str] = set()
            retry_ms = 0
            while not set(pending) <= answered:
                reply = json.loads(ws.recv(timeout=max(1.0, deadline - time.monotonic())))
                ids_in_reply = set(reply.get("ids") or [])
                answered |= ids_in_reply
                if reply["type"] == "ack":
                    self.acked |= ids_in_reply
                elif reply["type"] == "busy":
                    retry_ms = max(retry_ms, int(reply.get("retry_after_ms", 100)))
                else:
                    raise AssertionError(f"device {self.device_id}: error frame {reply}")
            pending = [i for i in pending if i not in self.acked]
            if pending:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(pending)} messages still busy after 60 s")
                time.sleep(retry_ms / 1000)


def stored_ids(cluster: Cluster, device_id: str) -> list[str]:
    """Every stored msg_id of ``device_id`` over all storage pods (duplicates kept)."""
    pods = cluster.get_json("pods", "-n", NAMESPACE, "-l",
                            f"iotpipe.dev/pipeline={PIPELINE},iotpipe.dev/tier=storage")
    ids: list[str] = []
    for pod in pods["items"]:
        if pod["status"].get("phase") != "Running":
            continue
        result = cluster.kubectl("-n", NAMESPACE, "exec", pod["metadata"]["name"], "--",
                                 "iotpipe", "query", "--db", STORE_DB, "--device", device_id,
                                 "--json", check=False, timeout=60)
        if result.returncode != 0:
            continue  # the store is created on the first write
        ids += [json.loads(line)["msg_id"] for line in result.stdout.splitlines() if line]
    return ids


def assert_all_stored_once(cluster: Cluster, device: Device, timeout: float = 180) -> None:
    assert device.acked, f"device {device.device_id}: nothing was acknowledged"
    seen: list[str] = []

    def complete() -> bool:
        seen[:] = stored_ids(cluster, device.device_id)
        return device.acked <= set(seen)

    try:
        wait_for(complete, timeout,
                 f"{len(device.acked)} acknowledged messages of {device.device_id} in storage",
                 interval=3)
    except AssertionError:
        missing = sorted(device.acked - set(seen))
        raise AssertionError(f"{len(missing)} acknowledged messages lost, e.g. "
                             f"{missing[:10]}\n{cluster.diagnostics()}") from None
    duplicates = {i for i in seen if seen.count(i) > 1}
    assert not duplicates, f"stored more than once: {sorted(duplicates)[:10]}"


def ingest_pods(cluster: Cluster) -> list[str]:
    pods = cluster.get_json("pods", "-n", NAMESPACE, "-l",
                            f"iotpipe.dev/pipeline={PIPELINE},iotpipe.dev/tier=ingest")
    return sorted(p["metadata"]["name"] for p in pods["items"])


def wait_for_ingest_replicas(cluster: Cluster, replicas: int, timeout: float = 600) -> None:
    def settled() -> bool:
        sts = cluster.get_json("statefulset", "-n", NAMESPACE, f"{PIPELINE}-ingest")
        status = sts.get("status", {})
        return (sts["spec"].get("replicas") == replicas
                and status.get("readyReplicas", 0) == replicas
                and status.get("replicas", 0) == replicas
                and len(ingest_pods(cluster)) == replicas)

    wait_for(settled, timeout, f"{replicas} ready ingest pods", interval=3,
             details=cluster.diagnostics)


# ---------------------------------------------------------------- tests


def test_operator_runs_non_root_with_a_live_health_endpoint(cluster: Cluster,
                                                            operator: str) -> None:
    deployment = cluster.get_json("deployment", "-n", OPERATOR_NAMESPACE, operator)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["status"].get("readyReplicas") == 1
    pods = cluster.get_json("pods", "-n", OPERATOR_NAMESPACE, "-l",
                            "app.kubernetes.io/name=iotpipe-operator")
    (pod,) = pods["items"]
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    probe = ("import os, urllib.request; "
             "r = urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=10); "
             "print(os.getuid(), r.status)")
    answer = cluster.kubectl("-n", OPERATOR_NAMESPACE, "exec", pod["metadata"]["name"], "--",
                             "python3", "-c", probe).stdout.split()
    assert answer == ["10001", "200"]  # non-root, and kopf's liveness endpoint answers


def test_pipeline_becomes_ready_with_every_tier(cluster: Cluster,
                                               pipeline: dict[str, Any]) -> None:
    status = cluster.get_json("iotpipeline", "-n", NAMESPACE, PIPELINE)["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    for kind, name in (("statefulset", "ingest"), ("statefulset", "middle"),
                       ("deployment", "relay"), ("statefulset", "storage")):
        cluster.kubectl("-n", NAMESPACE, "rollout", "status", f"{kind}/{PIPELINE}-{name}",
                        "--timeout=120s", timeout=150)


def test_device_traffic_is_stored(cluster: Cluster, pipeline: dict[str, Any],
                                  auth_secret: str) -> None:
    device = Device("e2e-sensor-1", device_token("e2e-sensor-1", auth_secret))
    ids = [f"m-{i}" for i in range(500)]
    with port_forward(cluster, f"svc/{PIPELINE}-ingest", 8080) as port:
        device.send(port, ids)
    assert not device.errors, device.errors
    assert device.acked == set(ids)
    assert_all_stored_once(cluster, device)


def test_bad_token_is_refused(cluster: Cluster, pipeline: dict[str, Any]) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    forged = device_token("e2e-intruder", "not-the-cluster-secret-" + "x" * 16)
    with port_forward(cluster, f"svc/{PIPELINE}-ingest", 8080) as port, \
            pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{port}/v1/ingest", open_timeout=30,
                additional_headers={"Authorization": f"Bearer {forged}"}).close()
    assert refused.value.response.status_code in (401, 403)


def test_scale_ingest_up_and_down_loses_nothing(cluster: Cluster, pipeline: dict[str, Any],
                                                auth_secret: str) -> None:
    cluster.kubectl("-n", NAMESPACE, "scale", f"iotpipeline/{PIPELINE}", "--replicas=3")
    wait_for_ingest_replicas(cluster, 3)
    devices = []
    for index, pod in enumerate(ingest_pods(cluster)):
        device_id = f"e2e-scale-{index}"
        device = Device(device_id, device_token(device_id, auth_secret))
        with port_forward(cluster, f"pod/{pod}", 8080) as port:
            device.send(port, [f"s-{i}" for i in range(200)])
        assert not device.errors, device.errors
        assert len(device.acked) == 200, f"{pod} acknowledged {len(device.acked)}/200"
        devices.append(device)
    # Scaling down removes the pods that just took traffic: they drain to the middle tier.
    cluster.kubectl("-n", NAMESPACE, "scale", f"iotpipeline/{PIPELINE}", "--replicas=1")
    wait_for_ingest_replicas(cluster, 1)
    wait_until_ready(cluster, timeout=300)
    for device in devices:
        assert_all_stored_once(cluster, device, timeout=300)


def _stream_while(cluster: Cluster, device: Device, target: str, disrupt: Callable[[], None],
                  total: int, prefix: str) -> None:
    """Stream ``total`` messages; run ``disrupt`` once a third is acknowledged; reconnect
    (through a fresh port-forward) until everything is acknowledged."""
    ids = [f"{prefix}-{i}" for i in range(total)]
    disrupted = False
    deadline = time.monotonic() + 600
    while len(device.acked) < total:
        assert time.monotonic() < deadline, f"{device.device_id}: stream did not finish"
        before = len(device.acked)
        try:
            with port_forward(cluster, target, 8080) as port:
                sender = threading.Thread(target=device.send, args=(port, ids), daemon=True)
                sender.start()
                while sender.is_alive():
                    if not disrupted and len(device.acked) >= total // 3:
                        disrupt()
                        disrupted = True
                    sender.join(timeout=0.2)
        except PortForwardError:
            time.sleep(2)  # the pod is not back yet
        if device.errors:
            raise device.errors[0]
        if len(device.acked) == before:
            time.sleep(1)  # no progress (pod restarting): do not spin
    assert disrupted, "the stream finished before the disruption ran"


def test_middle_pod_deleted_mid_stream_loses_nothing(
        cluster: Cluster, pipeline: dict[str, Any], auth_secret: str) -> None:
    device = Device("e2e-middle-kill", device_token("e2e-middle-kill", auth_secret), batch=5)
    _stream_while(cluster, device, f"svc/{PIPELINE}-ingest", lambda: cluster.kubectl(
        "-n", NAMESPACE, "delete", "pod", f"{PIPELINE}-middle-0", "--grace-period=0",
        "--force", "--wait=false"), total=3000, prefix="mk")
    wait_until_ready(cluster, timeout=300)
    assert_all_stored_once(cluster, device, timeout=300)


def test_ingest_pod_killed_mid_stream_loses_nothing(
        cluster: Cluster, pipeline: dict[str, Any], auth_secret: str) -> None:
    pod = ingest_pods(cluster)[0]
    device = Device("e2e-ingest-kill", device_token("e2e-ingest-kill", auth_secret), batch=5)
    # Force deletion skips the drain: the restarted pod must recover the queue from its
    # volume and forward what it had acknowledged.
    _stream_while(cluster, device, f"pod/{pod}", lambda: cluster.kubectl(
        "-n", NAMESPACE, "delete", "pod", pod, "--grace-period=0", "--force",
        "--wait=false"), total=3000, prefix="ik")
    wait_until_ready(cluster, timeout=300)
    assert_all_stored_once(cluster, device, timeout=300)
