"""The API server: KMock's emulator plus what a real API server adds.

KMock 0.8 stores objects and streams watch events but assigns no ``uid``,
``resourceVersion``, ``generation`` or ``creationTimestamp``, has no ``generateName``,
treats every PATCH as a merge patch and has no pod proxy. The controllers and the garbage
collector here need the metadata (owner references name their owner by uid), and the
operator needs the rest, so :class:`ClusterEmulator` adds:

- the metadata, as an API server assigns it (``generation`` moves with ``spec`` only);
- server-side apply for one field manager (``application/apply-patch+yaml``): what the
  manager's previous apply (or create with ``fieldManager``) set and this one does not is
  removed, unless another writer's merge patch has set it since (it then owns the field,
  as the HPA owns ``replicas`` once it scales); lists are atomic (the approach of
  ``tests/operator/kmock_emulator.py``);
- the pod proxy ``/api/v1/namespaces/NS/pods/POD:PORT/proxy/PATH``, forwarded for real to
  the pod's address (``pod_address`` is set by the cluster);
- :attr:`unavailable`: API paths that answer 503 (a failing aggregated API server).
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import kmock
import yaml

PIPELINES = "iotpipe.dev/v1alpha1/iotpipelines"
RW_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
APPLY = "application/apply-patch+yaml"
_PROXY = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/:]+):(\d+)/proxy(/.*)?$")


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _differs(current: Any, patch: Any) -> bool:
    """Whether a JSON merge patch would change ``current``."""
    if isinstance(patch, dict):
        if not isinstance(current, dict):
            return True
        for key, value in patch.items():
            if value is None:
                if key in current:
                    return True
            elif key not in current or _differs(current[key], value):
                return True
        return False
    return bool(current != patch)


def removed_fields(previous: Any, current: Any) -> dict[str, Any]:
    """A merge patch that deletes what ``previous`` set and ``current`` does not."""
    out: dict[str, Any] = {}
    if not isinstance(previous, dict) or not isinstance(current, dict):
        return out
    for key, value in previous.items():
        if key not in current:
            out[key] = None
        elif isinstance(value, dict) and isinstance(current[key], dict):
            nested = removed_fields(value, current[key])
            if nested:
                out[key] = nested
    return out


def taken_over(applied: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``applied`` without the fields another writer's merge patch just set: that writer
    now owns (or co-owns) them, so a later apply that leaves them out keeps them."""
    out: dict[str, Any] = {}
    for key, value in applied.items():
        if key not in patch:
            out[key] = value
        elif isinstance(value, dict) and isinstance(patch[key], dict):
            out[key] = taken_over(value, patch[key])
    return out


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = overlay(result[key], value)
        else:
            result[key] = value
    return result


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({"kind": "Status", "status": "Failure", "code": code,
                                      "reason": reason, "message": message}, status=code)


class ClusterEmulator(kmock.KubernetesEmulator):
    """KMock with API-server metadata, server-side apply, the pod proxy and 503s."""

    _serial = itertools.count(1)
    _versions = itertools.count(1000)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.applied: dict[str, dict[str, Any]] = {}  # object path -> last applied config
        self.unavailable: set[str] = set()  # API paths answering 503
        self.unavailable_hits = 0  # requests answered 503 so far
        self.pod_address: Callable[[str], str | None] = lambda pod: None

    async def _proxy(self, pod: str, port: str, path: str) -> aiohttp.web.Response:
        address = self.pod_address(pod)
        if not address:
            return _status(503, "ServiceUnavailable", f"pod {pod} has no address")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http, \
                    http.get(f"http://{address}:{port}{path}") as response:
                body = await response.read()
                return aiohttp.web.Response(status=response.status, body=body,
                                            content_type="text/plain")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return _status(503, "ServiceUnavailable", f"error trying to reach {pod}: {exc}")

    async def _handle(self, request: Any) -> Any:
        path = request.url.path
        if path in self.unavailable:
            self.unavailable_hits += 1
            return _status(503, "ServiceUnavailable",
                           "the server is currently unable to handle the request")
        proxied = _PROXY.match(path)
        if proxied:
            return await self._proxy(proxied.group(2), proxied.group(3),
                                     proxied.group(4) or "/")
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            if request.action == kmock.action.CREATE:
                name = (data.get("metadata") or {}).get("name")
                if request.params.get("fieldManager") and name:
                    self.applied[f"{path}/{name}"] = json.loads(json.dumps(data))
            elif request.action == kmock.action.DELETE:
                self.applied.pop(path, None)
            elif (request.method == kmock.method.PATCH
                  and request.headers.get("Content-Type", "").startswith(APPLY)):
                patch = overlay(removed_fields(self.applied.get(path, {}), data), data)
                self.applied[path] = json.loads(json.dumps(data))
                object.__setattr__(request, "data", patch)
                data = patch
            elif request.method == kmock.method.PATCH and path in self.applied:
                self.applied[path] = taken_over(self.applied[path], data)
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{next(self._serial):05d}"
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", _now())
                meta["resourceVersion"] = str(next(self._versions))
                meta.setdefault("generation", 1)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                current = self._stored(request.resource, request.namespace, request.name)
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = str(next(self._versions))
                if (current is not None and "spec" in data
                        and _differs(current.get("spec") or {}, data["spec"])):
                    meta["generation"] = int(current["metadata"].get("generation", 1)) + 1
        return await super()._handle(request)

    def _stored(self, resource: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
        stored = None
        for (res, ns, stored_name), candidate in self.objects.items():
            if res == resource and ns == namespace and stored_name == name:
                stored = candidate
                break
        if stored is None or stored.deleted:
            return None
        return dict(stored.raw)


def register_resources(emulator: Any, *, keda: bool = False) -> None:
    """The built-in catalogue plus the IoTPipeline CRD (and KEDA's when asked)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # KMock's importlib call
        emulator.resources.load_bundled()
    emulator.resources[PIPELINES] = kmock.ResourceInfo(
        kind="IoTPipeline", singular="iotpipeline", namespaced=True, shortnames={"iotp"},
        verbs=RW_VERBS, subresources={"status", "scale"})
    if keda:
        emulator.resources["keda.sh/v1alpha1/scaledobjects"] = kmock.ResourceInfo(
            kind="ScaledObject", singular="scaledobject", namespaced=True, verbs=RW_VERBS)


def write_kubeconfig(path: Path, url: str, namespace: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "local",
        "clusters": [{"name": "local", "cluster": {"server": url.rstrip("/")}}],
        "users": [{"name": "local", "user": {"token": "test"}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "local",
                                                   "namespace": namespace}}],
    }))
    return path


def api_prefix(api_version: str) -> str:
    return f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"


class ApiError(RuntimeError):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"{status}: {text[:300]}")
        self.status = status


class Api:
    """Reads straight from the emulator's store, writes through HTTP (so watchers see them)."""

    def __init__(self, emulator: Any, namespace: str) -> None:
        self.k = emulator
        self.ns = namespace

    # -- reads ------------------------------------------------------------------------------

    def items(self, resource: str) -> Iterator[dict[str, Any]]:
        wanted = kmock.resource(resource)
        for (res, ns, _name), stored in list(self.k.objects.items()):
            if ((res.group, res.version, res.plural) == (wanted.group, wanted.version,
                                                          wanted.plural)
                    and ns == self.ns and not stored.deleted):
                yield stored.raw

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        return next((o for o in self.items(resource) if o["metadata"]["name"] == name), None)

    def served(self, resource: str) -> bool:
        return resource in self.k.resources

    def names(self, resource: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.items(resource)}

    def all_live(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every live object with its resource path (``group/version/plural``)."""
        for (res, _ns, _name), stored in list(self.k.objects.items()):
            if not stored.deleted:
                group = f"{res.group}/" if res.group else ""
                yield f"{group}{res.version}/{res.plural}", stored.raw

    # -- writes -----------------------------------------------------------------------------

    def path(self, resource: str, name: str | None = None, sub: str = "") -> str:
        res = kmock.resource(resource)
        version = f"{res.group}/{res.version}" if res.group else res.version
        path = f"{api_prefix(version)}/namespaces/{self.ns}/{res.plural}"
        if name:
            path += f"/{name}"
        return path + (f"/{sub}" if sub else "")

    async def send(self, method: str, path: str, body: Any = None,
                   ok_missing: bool = False) -> dict[str, Any]:
        # Connection: close, so no keep-alive server task outlives the request.
        headers = {"Connection": "close"}
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        async with self.k.request(method, path, json=body, headers=headers) as response:
            text = await response.text()
            if ok_missing and response.status == 404:
                return {}
            if response.status >= 300:
                raise ApiError(response.status, f"{method} {path}: {text}")
            return json.loads(text) if text else {}

    async def create(self, resource: str, body: dict[str, Any]) -> dict[str, Any]:
        body.setdefault("metadata", {}).setdefault("namespace", self.ns)
        return await self.send("POST", self.path(resource), body)

    async def patch(self, resource: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.send("PATCH", self.path(resource, name), body, ok_missing=True)

    async def patch_status(self, resource: str, name: str,
                           status: dict[str, Any]) -> dict[str, Any]:
        return await self.send("PATCH", self.path(resource, name), {"status": status},
                               ok_missing=True)

    async def delete(self, resource: str, name: str) -> dict[str, Any]:
        return await self.send("DELETE", self.path(resource, name), ok_missing=True)
