"""The local cluster's API server: :class:`support.apiserver.ApiServerEmulator` (KMock plus
API-server metadata, server-side apply with managedFields, the pod proxy forwarded for real to
the pods, 503 paths), the resource catalogue, a kubeconfig for it, and :class:`Api`, the
tests' and controllers' client.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kmock
import yaml

from support.apiserver import ApiServerEmulator

PIPELINES = "iotpipe.dev/v1alpha1/iotpipelines"
RW_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}

ClusterEmulator = ApiServerEmulator  # the local cluster's API server


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
