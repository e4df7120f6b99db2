"""The API server: KMock's emulator plus what a real API server adds on every write.

KMock 0.8 stores objects and streams watch events but assigns no ``uid``,
``resourceVersion``, ``generation`` or ``creationTimestamp`` and has no ``generateName``;
the controllers and the garbage collector here need all of them (owner references name
their owner by uid), so :class:`ClusterEmulator` fills them in as an API server would.
"""

from __future__ import annotations

import datetime
import itertools
import json
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import yaml

PIPELINES = "iotpipe.dev/v1alpha1/iotpipelines"
RW_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


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


class ClusterEmulator(kmock.KubernetesEmulator):
    """KMock with uid, resourceVersion, generation, creationTimestamp and generateName."""

    _serial = itertools.count(1)
    _versions = itertools.count(1000)

    async def _handle(self, request: Any) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
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
