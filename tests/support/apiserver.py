"""KMock's emulator plus what a real API server adds, for every test that runs the operator.

KMock 0.8 stores objects and streams watch events but assigns no ``uid``,
``resourceVersion``, ``generation`` or ``creationTimestamp``, has no ``generateName``,
treats every PATCH as a merge patch and has no pod proxy. :class:`ApiServerEmulator` adds:

- the metadata, as an API server assigns it (values a test seeds are kept; ``generation``
  moves with ``spec`` only);
- server-side apply (``application/apply-patch+yaml``) for the operator's field manager:
  what its previous apply (or its create with ``fieldManager``) set and this one does not
  is removed, unless another writer's merge patch has set it since (that writer then owns
  it, as the HPA owns ``replicas`` once it scales). ``metadata.managedFields`` lists the
  applier's fields, as the operator reads them. Lists are atomic, as in a merge patch;
- the pod proxy ``/api/v1/namespaces/NS/pods/POD:PORT/proxy/PATH``: answered from
  :attr:`metrics` (pod name -> Prometheus text) when the test fakes the pods, else forwarded
  for real to :attr:`pod_address` (the local cluster's pods);
- :attr:`unavailable`: API paths that answer 503 (a failing aggregated API server);
- 422 for a JSON patch whose ``test`` operation fails (KMock answers 500).

KMock still answers 404 to a PATCH of a missing object (the operator creates first).
"""

from __future__ import annotations

import datetime
import itertools
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import aiohttp.web
import jsonpatch
import kmock

__all__ = ["APPLY", "ApiServerEmulator", "differs", "overlay", "removed_fields", "taken_over"]

APPLY = "application/apply-patch+yaml"
_PROXY = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/:]+):(\d+)/proxy(/.*)?$")


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def differs(current: Any, patch: Any) -> bool:
    """Whether a JSON merge patch would change ``current``."""
    if isinstance(patch, dict):
        if not isinstance(current, dict):
            return True
        for key, value in patch.items():
            if value is None:
                if key in current:
                    return True
            elif key not in current or differs(current[key], value):
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


def fields_v1(config: dict[str, Any]) -> dict[str, Any]:
    """managedFields' fieldsV1 for an applied configuration (lists as leaves)."""
    return {f"f:{key}": fields_v1(value) if isinstance(value, dict) else {}
            for key, value in config.items()}


def _managed(manager: str, applied: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"manager": manager, "operation": "Apply", "apiVersion": applied.get("apiVersion"),
             "fieldsType": "FieldsV1", "fieldsV1": fields_v1(applied)}]


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    return aiohttp.web.json_response({"kind": "Status", "status": "Failure", "code": code,
                                      "reason": reason, "message": message}, status=code)


class ApiServerEmulator(kmock.KubernetesEmulator):
    """KMock with API-server metadata, server-side apply, the pod proxy and 503s."""

    _serial = itertools.count(1)
    _versions = itertools.count(1000)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.applied: dict[str, dict[str, Any]] = {}  # object path -> last applied config
        self.managers: dict[str, str] = {}  # object path -> its applier's field manager
        self.metrics: dict[str, str] = {}  # pod name -> Prometheus text (faked pods)
        self.unavailable: set[str] = set()  # API paths answering 503
        self.unavailable_hits = 0  # requests answered 503 so far
        self.pod_address: Callable[[str], str | None] = lambda pod: None

    async def _proxy(self, pod: str, port: str, path: str) -> aiohttp.web.Response:
        if pod in self.metrics:
            return aiohttp.web.Response(text=self.metrics[pod], content_type="text/plain")
        address = self.pod_address(pod)
        if address is None:
            return _status(503, "ServiceUnavailable", f"pod {pod} is not serving")
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
            data = self._field_management(request, path, data)
            self._metadata(request, data)
        try:
            return await super()._handle(request)
        except jsonpatch.JsonPatchTestFailed as exc:
            # A JSON patch whose "test" fails (kopf tests resourceVersion before removing a
            # finalizer) is 422 on a real API server, and kopf retries it on its next cycle
            # against the fresh object. KMock answered 500, which kopf retries as a server
            # error with the same stale patch for half a minute (seen in CI).
            return _status(422, "Invalid", f"the server rejected our request due to an error "
                                           f"in our request: {exc}")

    def _field_management(self, request: Any, path: str, data: dict[str, Any]
                          ) -> dict[str, Any]:
        if request.action == kmock.action.CREATE:
            name = (data.get("metadata") or {}).get("name")
            manager = request.params.get("fieldManager")
            if manager and name:
                # The operator POSTs only after its create-by-apply got KMock's 404: on a
                # real server the apply would have created it, so record it as applied.
                self.applied[f"{path}/{name}"] = json.loads(json.dumps(data))
                self.managers[f"{path}/{name}"] = manager
                data.setdefault("metadata", {})["managedFields"] = _managed(manager, data)
        elif request.action == kmock.action.DELETE:
            self.applied.pop(path, None)
            self.managers.pop(path, None)
        elif (request.method == kmock.method.PATCH
              and request.headers.get("Content-Type", "").startswith(APPLY)):
            manager = request.params.get("fieldManager", "")
            patch = overlay(removed_fields(self.applied.get(path, {}), data), data)
            self.applied[path] = json.loads(json.dumps(data))
            self.managers[path] = manager
            patch.setdefault("metadata", {})["managedFields"] = _managed(manager, data)
            object.__setattr__(request, "data", patch)
            return patch
        elif request.method == kmock.method.PATCH and path in self.applied:
            applied = taken_over(self.applied[path], data)
            self.applied[path] = applied
            if data.get("spec"):  # the applier's managedFields no longer list those fields
                data = {**data, "metadata": {**(data.get("metadata") or {}),
                                             "managedFields": _managed(self.managers[path],
                                                                       applied)}}
                object.__setattr__(request, "data", data)
        return data

    def _metadata(self, request: Any, data: dict[str, Any]) -> None:
        if request.action == kmock.action.CREATE:
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{next(self._serial):05d}"
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta.setdefault("resourceVersion", str(next(self._versions)))
            meta.setdefault("generation", 1)
        elif request.action == kmock.action.UPDATE and request.name is not None:
            current = self._stored(request.resource, request.namespace, request.name)
            meta = data.setdefault("metadata", {})
            meta["resourceVersion"] = str(next(self._versions))
            if (current is not None and "spec" in data
                    and differs(current.get("spec") or {}, data["spec"])):
                meta["generation"] = int(current["metadata"].get("generation", 1)) + 1

    def _stored(self, resource: Any, namespace: str | None, name: str) -> dict[str, Any] | None:
        stored = None
        for (res, ns, stored_name), candidate in self.objects.items():
            if res == resource and ns == namespace and stored_name == name:
                stored = candidate
                break
        if stored is None or stored.deleted:
            return None
        return dict(stored.raw)
