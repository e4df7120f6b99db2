"""The kubelet's part: a Pod object becomes a local process group.

What a pod gets, as on a node:
- its own loopback address (the pod IP) and its own hostname (a UTS namespace), so every
  tier binds its real ports and derives its identity from the pod name;
- a private mount namespace with its own hosts file bind-mounted over ``/etc/hosts``;
- its container's command and args, environment from ``envFrom``, ``env`` (values,
  ``$(VAR)`` references, ``valueFrom`` fieldRef / configMapKeyRef / secretKeyRef) and
  ``HOSTNAME``; ``IOTPIPE_<TIER>_HOST`` set to the pod IP (binding ``0.0.0.0`` inside a
  pod means the pod's address, contract 4);
- volumes as directories: emptyDir per pod, a PVC's directory that outlives the pod,
  ConfigMap and Secret files rewritten when the object changes. Container paths in args
  and environment are mapped to these directories (``/tmp`` through ``TMPDIR``);
- readiness (and startup) probes by HTTP GET to the pod address, reflected in the pod's
  status (readiness runs at least every ``PROBE_PERIOD_CAP`` seconds, to keep tests short);
  liveness and startup failures restart the container on the probes' real schedule; a
  container that exits is restarted (``restartPolicy: Always``, with a compressed
  back-off) or ends the pod (``Never`` / ``OnFailure`` for Jobs);
- deletion: preStop, SIGTERM to the process group, SIGKILL after
  ``terminationGracePeriodSeconds``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

PROBE_PERIOD_CAP = 0.5  # seconds: probes run at most this far apart (tests are short)
SHELL = ('h="$1" && mount --bind "$h" /etc/hosts && hostname "$2" && shift 2 '
         '&& cd "$h.d" && exec "$@"')


# Without root, a user namespace grants the bind mount and the hostname (checked by hand as
# nobody: `setpriv --reuid=65534 unshare --user --map-root-user --mount --uts ...`).
USERNS = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]


class PodNotReady(Exception):
    """A pod cannot start yet (a referenced ConfigMap, Secret or PVC is missing)."""


@dataclass
class Volume:
    name: str
    path: Path
    source: dict[str, Any]


@dataclass
class Container:
    """The running process group of a pod's (single) container."""

    pod: str
    ip: str
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: bool = False
    started: bool = False
    exit_code: int | None = None
    terminating: bool = False
    probe_failures: int = 0
    next_start: float = 0.0
    last_probe: float = 0.0
    last_liveness: float = 0.0
    liveness_failures: int = 0
    spawned_at: float = 0.0
    volumes: list[Volume] = field(default_factory=list)
    log: Path | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    mounts: dict[str, Path] = field(default_factory=dict)  # container path -> directory


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` references (``$$`` escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  text)


def map_paths(text: str, mounts: dict[str, Path]) -> str:
    """Container paths (mount points) in ``text`` replaced by the pod's directories (a
    whole path component only: ``/app`` maps ``/app/x``, not ``/apple``)."""
    for container_path in sorted(mounts, key=len, reverse=True):
        text = re.sub(re.escape(container_path) + r"(?=/|$|[^\w.-])",
                      lambda _m, p=str(mounts[container_path]): p, text)
    return text


def _secret_data(secret: dict[str, Any]) -> dict[str, bytes]:
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    data.update({k: v.encode() for k, v in (secret.get("stringData") or {}).items()})
    return data


def _configmap_data(configmap: dict[str, Any]) -> dict[str, bytes]:
    return {k: str(v).encode() for k, v in (configmap.get("data") or {}).items()}


def _field(pod: dict[str, Any], ip: str, path: str) -> str:
    meta = pod["metadata"]
    if path == "status.podIP" or path == "status.hostIP":
        return ip
    if path == "spec.nodeName":
        return str(pod["spec"].get("nodeName", "local"))
    if path == "spec.serviceAccountName":
        return str(pod["spec"].get("serviceAccountName", "default"))
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path.startswith("metadata."):
        return str(meta.get(path.split(".", 1)[1], ""))
    raise ValueError(f"fieldRef {path!r} is not supported by the local kubelet")


class Kubelet:
    """Runs pods for one namespace; the cluster calls :meth:`sync` on every pass."""

    def __init__(self, api: Any, root: Path, bin_dir: Path, hosts_for: Any) -> None:
        self.api = api
        self.root = root
        self.bin_dir = bin_dir
        self.hosts_for = hosts_for  # pod name -> hosts file text
        self.containers: dict[str, Container] = {}
        self._terminations: dict[str, asyncio.Task[None]] = {}
        self._http: aiohttp.ClientSession | None = None
        self._last_status: dict[str, Any] = {}

    # -- volumes and environment ------------------------------------------------------------

    def pvc_dir(self, claim: str) -> Path:
        return self.root / "pvcs" / claim

    def pod_dir(self, pod: str) -> Path:
        return self.root / "pods" / pod

    def hosts_file(self, pod: str) -> Path:
        return self.pod_dir(pod) / "hosts"

    def _lookup(self, resource: str, name: str) -> dict[str, Any]:
        obj = self.api.get(resource, name)
        if obj is None:
            raise PodNotReady(f"{resource} {name} not found")
        return dict(obj)

    def _project(self, volume: dict[str, Any], target: Path) -> None:
        """Write a ConfigMap or Secret volume's files (only the files whose content changed,
        each replaced atomically, like the kubelet's symlink swap)."""
        if "configMap" in volume:
            source = volume["configMap"]
            data = _configmap_data(self._lookup("v1/configmaps", source["name"]))
        else:
            source = volume["secret"]
            data = _secret_data(self._lookup("v1/secrets", source["secretName"]))
        items = source.get("items")
        files = ({item["path"]: data[item["key"]] for item in items if item["key"] in data}
                 if items else data)
        target.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            path = target / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.read_bytes() == content:
                continue
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(content)
            tmp.replace(path)
        for stale in [p for p in target.rglob("*") if p.is_file()
                      and not p.name.startswith(".")
                      and str(p.relative_to(target)) not in files]:
            stale.unlink()

    def _volumes(self, pod: dict[str, Any]) -> list[Volume]:
        name = pod["metadata"]["name"]
        out: list[Volume] = []
        for volume in pod["spec"].get("volumes") or []:
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                self._lookup("v1/persistentvolumeclaims", claim)
                path = self.pvc_dir(claim)
            elif "emptyDir" in volume:
                path = self.pod_dir(name) / "volumes" / volume["name"]
            elif "configMap" in volume or "secret" in volume:
                path = self.pod_dir(name) / "volumes" / volume["name"]
                self._project(volume, path)
            else:
                raise ValueError(f"volume {volume['name']}: kind not supported locally")
            path.mkdir(parents=True, exist_ok=True)
            out.append(Volume(volume["name"], path, volume))
        return out

    def _environment(self, pod: dict[str, Any], container: dict[str, Any], ip: str,
                     volumes: list[Volume]
                     ) -> tuple[list[str], dict[str, str], dict[str, Path]]:
        name = pod["metadata"]["name"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = _configmap_data(self._lookup("v1/configmaps",
                                                    source["configMapRef"]["name"]))
            else:
                data = _secret_data(self._lookup("v1/secrets", source["secretRef"]["name"]))
            env.update({prefix + k: v.decode() for k, v in data.items()})
        for item in container.get("env") or []:
            if "valueFrom" not in item:
                env[item["name"]] = _expand(str(item.get("value", "")), env)
                continue
            ref = item["valueFrom"]
            if "fieldRef" in ref:
                env[item["name"]] = _field(pod, ip, ref["fieldRef"]["fieldPath"])
            elif "configMapKeyRef" in ref:
                key = ref["configMapKeyRef"]
                env[item["name"]] = _configmap_data(
                    self._lookup("v1/configmaps", key["name"]))[key["key"]].decode()
            elif "secretKeyRef" in ref:
                key = ref["secretKeyRef"]
                env[item["name"]] = _secret_data(
                    self._lookup("v1/secrets", key["name"]))[key["key"]].decode()
            else:
                raise ValueError(f"env {item['name']}: valueFrom kind not supported locally")
        # Binding 0.0.0.0 inside a pod's network namespace means the pod's own address.
        for key, value in list(env.items()):
            if re.fullmatch(r"IOTPIPE_[A-Z]+_HOST", key) and value in ("0.0.0.0", "::"):
                env[key] = ip
        env[f"IOTPIPE_{container['name'].upper()}_HOST"] = ip

        mounts: dict[str, Path] = {}
        by_name = {v.name: v for v in volumes}
        for mount in container.get("volumeMounts") or []:
            path = by_name[mount["volumeName"] if "volumeName" in mount else mount["name"]].path
            if mount.get("subPath"):
                path = path / mount["subPath"]
            mounts[mount["mountPath"].rstrip("/")] = path
        tmp = mounts.pop("/tmp", self.pod_dir(name) / "tmp")
        tmp.mkdir(parents=True, exist_ok=True)

        env = {k: map_paths(v, mounts) for k, v in env.items()}
        command = [map_paths(_expand(a, env), mounts) for a in
                   [*(container.get("command") or []), *(container.get("args") or [])]]
        base = {"PATH": f"{self.bin_dir}:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
                "HOME": str(self.pod_dir(name)), "TMPDIR": str(tmp), "HOSTNAME": name,
                "PYTHONUNBUFFERED": "1"}
        return command, {**base, **env}, mounts

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0))

    async def stop(self) -> None:
        tasks = list(self._terminations.values())
        for task in tasks:
            task.cancel()
        for container in list(self.containers.values()):
            self._kill(container)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, timeout=15)
        for container in list(self.containers.values()):
            if container.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(container.proc.wait, 10)
        if self._http is not None:
            await self._http.close()

    @staticmethod
    def _kill(container: Container) -> None:
        proc = container.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def _spawn(self, pod: dict[str, Any], container: Container) -> None:
        name = pod["metadata"]["name"]
        spec = pod["spec"]["containers"][0]
        volumes = self._volumes(pod)
        command, env, container.mounts = self._environment(pod, spec, container.ip, volumes)
        hosts = self.hosts_file(name)
        hosts.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{hosts}.d").mkdir(exist_ok=True)  # the process's working directory
        if not hosts.exists():
            hosts.write_text(self.hosts_for(name))
        container.volumes, container.argv, container.env = volumes, command, env
        container.log = self.pod_dir(name) / "container.log"
        with open(container.log, "ab") as log:
            log.write(f"--- start {time.strftime('%H:%M:%S')} {command}\n".encode())
            log.flush()
            container.proc = subprocess.Popen(
                ["unshare", *USERNS, "--mount", "--uts", "--propagation", "private", "--",
                 "sh", "-c", SHELL, "pod-init", str(hosts), name, *command],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        container.exit_code = None
        container.ready = container.started = False
        container.probe_failures = container.liveness_failures = 0
        container.spawned_at = container.last_liveness = time.monotonic()

    def running(self, pod: str) -> bool:
        container = self.containers.get(pod)
        return bool(container and container.proc and container.proc.poll() is None)

    def ready(self, pod: str) -> bool:
        container = self.containers.get(pod)
        return bool(container and container.ready and not container.terminating)

    def gone(self, pod: str) -> bool:
        """No process of this pod is left (terminated, or never started)."""
        return not self.running(pod) and pod not in self._terminations

    async def sync(self, pods: list[dict[str, Any]], allocate_ip: Any) -> None:
        live = {p["metadata"]["name"]: p for p in pods}
        # Pods whose object vanished (deleted without our finalizer): stop them too.
        for name, container in list(self.containers.items()):
            if name not in live and name not in self._terminations and self.running(name):
                self._terminations[name] = asyncio.create_task(
                    self._terminate(None, container, grace=30))
        for name, pod in live.items():
            container = self.containers.get(name)
            if pod["metadata"].get("deletionTimestamp"):
                if name not in self._terminations:
                    if container is None:
                        container = self.containers[name] = Container(name, "")
                    self._terminations[name] = asyncio.create_task(
                        self._terminate(pod, container,
                                        grace=int(pod["spec"].get(
                                            "terminationGracePeriodSeconds", 30))))
                continue
            if container is None:
                ip = (pod.get("status") or {}).get("podIP") or allocate_ip()
                container = self.containers[name] = Container(name, ip)
            await self._run(pod, container)
        await self._report(live)

    async def _run(self, pod: dict[str, Any], container: Container) -> None:
        proc = container.proc
        policy = pod["spec"].get("restartPolicy", "Always")
        if proc is not None and proc.poll() is not None and container.exit_code is None:
            container.exit_code = proc.returncode
            container.ready = False
            if policy == "Always" or (policy == "OnFailure" and proc.returncode != 0):
                container.restarts += 1
                # CrashLoopBackOff, compressed: 0.5 s doubling up to 8 s
                container.next_start = time.monotonic() + min(
                    8.0, 0.5 * 2 ** min(container.restarts - 1, 4))
        if proc is None or (container.exit_code is not None and container.next_start
                            and time.monotonic() >= container.next_start):
            try:
                self._spawn(pod, container)
            except PodNotReady:
                return
            container.next_start = 0.0
            return
        if container.exit_code is None:
            self._refresh_volumes(pod, container)
            await self._probe(pod, container)

    def _refresh_volumes(self, pod: dict[str, Any], container: Container) -> None:
        for volume in container.volumes:
            if "configMap" in volume.source or "secret" in volume.source:
                with contextlib.suppress(PodNotReady):  # a deleted source keeps the files
                    self._project(volume.source, volume.path)

    async def _probe(self, pod: dict[str, Any], container: Container) -> None:
        spec = pod["spec"]["containers"][0]
        now = time.monotonic()
        last = container.last_probe
        readiness = spec.get("readinessProbe")
        startup = spec.get("startupProbe")
        probe = startup if (startup and not container.started) else readiness
        await self._liveness(pod, container, startup)
        if probe is None:
            container.started = container.ready = True
            return
        period = min(float(probe.get("periodSeconds", 10)), PROBE_PERIOD_CAP)
        if now - last < period:
            return
        container.last_probe = now
        ok = await self._http_get(spec, container.ip, probe)
        if probe is startup:
            container.started = ok
            return
        container.started = True
        if ok:
            container.probe_failures = 0
            container.ready = True
        else:
            container.probe_failures += 1
            if container.probe_failures >= int(probe.get("failureThreshold", 3)):
                container.ready = False

    async def _liveness(self, pod: dict[str, Any], container: Container,
                        startup: dict[str, Any] | None) -> None:
        """Liveness and startup failures restart the container, on the probes' real
        schedule (periods are not compressed here: a restart is never hurried)."""
        spec = pod["spec"]["containers"][0]
        now = time.monotonic()
        if startup and not container.started:
            budget = (float(startup.get("initialDelaySeconds", 0))
                      + float(startup.get("periodSeconds", 10))
                      * int(startup.get("failureThreshold", 3)))
            if now - container.spawned_at > budget:
                self._restart(pod, container, "startup probe failed")
            return
        probe = spec.get("livenessProbe")
        if probe is None or now - container.spawned_at < float(
                probe.get("initialDelaySeconds", 0)):
            return
        if now - container.last_liveness < float(probe.get("periodSeconds", 10)):
            return
        container.last_liveness = now
        if await self._http_get(spec, container.ip, probe):
            container.liveness_failures = 0
            return
        container.liveness_failures += 1
        if container.liveness_failures >= int(probe.get("failureThreshold", 3)):
            self._restart(pod, container, "liveness probe failed")

    def _restart(self, pod: dict[str, Any], container: Container, why: str) -> None:
        """SIGTERM now, SIGKILL after the grace period; the exit then restarts it."""
        proc = container.proc
        if proc is None or proc.poll() is not None:
            return
        if container.log is not None:
            with open(container.log, "ab") as log:
                log.write(f"--- kubelet: {why}, restarting\n".encode())
        container.liveness_failures = 0
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))

        def kill() -> None:
            if container.proc is proc and proc.poll() is None:
                self._kill(container)

        asyncio.get_running_loop().call_later(grace, kill)

    async def _http_get(self, spec: dict[str, Any], ip: str, probe: dict[str, Any]) -> bool:
        get = probe.get("httpGet")
        if get is None:
            return True  # exec/tcp probes: treated as passing (none in this project)
        port = get["port"]
        if isinstance(port, str):
            port = next(p["containerPort"] for p in spec.get("ports", []) if p["name"] == port)
        assert self._http is not None
        try:
            async with self._http.get(f"http://{ip}:{port}{get.get('path', '/')}") as response:
                return 200 <= response.status < 400
        except (aiohttp.ClientError, OSError, TimeoutError):
            return False

    async def _terminate(self, pod: dict[str, Any] | None, container: Container,
                         grace: int) -> None:
        """preStop, SIGTERM, SIGKILL after the grace period; then release the pod object."""
        container.terminating = True
        container.ready = False
        deadline = time.monotonic() + grace
        try:
            if pod is not None and self.running(pod["metadata"]["name"]):
                pre_stop = ((pod["spec"]["containers"][0].get("lifecycle") or {})
                            .get("preStop") or {}).get("exec")
                if pre_stop:
                    hook = await asyncio.create_subprocess_exec(
                        *[map_paths(a, container.mounts) for a in pre_stop["command"]],
                        env=container.env, start_new_session=True)
                    try:
                        await asyncio.wait_for(hook.wait(), timeout=grace)
                    except TimeoutError:
                        hook.kill()
            proc = container.proc
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(proc.wait, max(0.0, deadline - time.monotonic()))
                self._kill(container)
                await asyncio.to_thread(proc.wait, 10)
            if proc is not None:
                # the group may have children that outlived the leader
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            if pod is not None:
                name = pod["metadata"]["name"]
                finalizers = [f for f in pod["metadata"].get("finalizers") or []
                              if f != FINALIZER]
                await self.api.patch("v1/pods", name, {"metadata": {"finalizers": finalizers}})
        finally:
            self.containers.pop(container.pod, None)
            self._terminations.pop(container.pod, None)

    async def _report(self, live: dict[str, dict[str, Any]]) -> None:
        for name, pod in live.items():
            container = self.containers.get(name)
            if container is None or pod["metadata"].get("deletionTimestamp"):
                continue
            policy = pod["spec"].get("restartPolicy", "Always")
            finished = (container.exit_code is not None and policy != "Always"
                        and not (policy == "OnFailure" and container.exit_code != 0))
            if finished:
                phase = "Succeeded" if container.exit_code == 0 else "Failed"
            elif container.proc is None:
                phase = "Pending"
            else:
                phase = "Running"
            ready = "True" if self.ready(name) else "False"
            state: dict[str, Any] = ({"terminated": {"exitCode": container.exit_code}}
                                     if container.exit_code is not None else
                                     {"running": {}} if container.proc else
                                     {"waiting": {"reason": "ContainerCreating"}})
            status = {
                "phase": phase, "podIP": container.ip, "hostIP": container.ip,
                "podIPs": [{"ip": container.ip}],
                "conditions": [{"type": "PodScheduled", "status": "True"},
                               {"type": "Initialized", "status": "True"},
                               {"type": "ContainersReady", "status": ready},
                               {"type": "Ready", "status": ready}],
                "containerStatuses": [{
                    "name": pod["spec"]["containers"][0]["name"], "ready": ready == "True",
                    "started": container.started, "restartCount": container.restarts,
                    "state": state}],
            }
            if self._last_status.get(name) != status:
                self._last_status[name] = status
                await self.api.patch_status("v1/pods", name, status)


FINALIZER = "local.iotpipe.dev/kubelet"


def default_bin_dir() -> Path:
    return Path(sys.executable).parent
