"""KMock's KubernetesEmulator plus what the operator tests need from an API server:

- ``metadata.generateName`` (kopf names its Events that way);
- server-side apply for one field manager: KMock treats every PATCH as a merge patch, so a
  field left out of an apply configuration would stay. Here an apply
  (``application/apply-patch+yaml``) removes what the same object's previous apply (or its
  create with a ``fieldManager``) set and this one no longer does, which is what SSA does
  for fields a single manager owns. Lists are atomic, as in a merge patch. Another writer's
  merge patch takes the fields it sets away from the applier (an HPA writing replicas), and
  ``metadata.managedFields`` shows the applier's fields;
- the pod proxy for metrics (``/api/v1/namespaces/NS/pods/POD:PORT/proxy/metrics``),
  answered from :attr:`metrics` (pod name -> Prometheus text; missing: 503).

KMock still answers 404 to a PATCH of a missing object (the operator creates first).
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import aiohttp.web
import kmock

APPLY = "application/apply-patch+yaml"
_PROXY = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/:]+):(\d+)/proxy/metrics$")


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


def fields_v1(config: dict[str, Any]) -> dict[str, Any]:
    """managedFields' fieldsV1 for an applied configuration (lists as leaves)."""
    return {f"f:{key}": fields_v1(value) if isinstance(value, dict) else {}
            for key, value in config.items()}


def disown(applied: dict[str, Any], patch: dict[str, Any]) -> None:
    """Another writer's update takes the fields it sets away from the applier."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(applied.get(key), dict):
            disown(applied[key], value)
        else:
            applied.pop(key, None)


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    result = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = overlay(result[key], value)
        else:
            result[key] = value
    return result


class Emulator(kmock.KubernetesEmulator):
    _serial = itertools.count(1)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.applied: dict[str, dict[str, Any]] = {}  # object path -> last applied config
        self.metrics: dict[str, str] = {}  # pod name -> Prometheus text
        self.unavailable: set[str] = set()  # paths answering 503 (a failing aggregated API)

    async def _handle(self, request: Any) -> Any:
        path = request.url.path
        if path in self.unavailable:
            return aiohttp.web.json_response(
                {"kind": "Status", "status": "Failure", "reason": "ServiceUnavailable",
                 "message": "the server is currently unable to handle the request",
                 "code": 503}, status=503)
        proxied = _PROXY.match(path)
        if proxied and request.method == kmock.method.GET:
            text = self.metrics.get(proxied.group(2))
            if text is None:
                return aiohttp.web.Response(status=503, text="pod not serving metrics")
            return aiohttp.web.Response(text=text, content_type="text/plain")
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = f"{meta['generateName']}{next(self._serial)}"
            if request.params.get("fieldManager"):
                # The operator POSTs only after its create-by-apply got KMock's 404: on a
                # real server the apply would have created it, so record it as applied.
                self.applied[f"{path}/{meta['name']}"] = json.loads(json.dumps(data))
                meta["managedFields"] = [{
                    "manager": request.params["fieldManager"], "operation": "Apply",
                    "apiVersion": data.get("apiVersion"), "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(data)}]
        elif request.action == kmock.action.DELETE:
            self.applied.pop(path, None)
        elif (request.method == kmock.method.PATCH and isinstance(data, dict)
              and request.headers.get("Content-Type", "").startswith(APPLY)):
            patch = overlay(removed_fields(self.applied.get(path, {}), data), data)
            self.applied[path] = data
            manager = request.params.get("fieldManager", "")
            patch.setdefault("metadata", {})["managedFields"] = [{
                "manager": manager, "operation": "Apply", "apiVersion": data.get("apiVersion"),
                "fieldsType": "FieldsV1", "fieldsV1": fields_v1(data)}]
            object.__setattr__(request, "data", patch)
        elif request.method == kmock.method.PATCH and isinstance(data, dict) \
                and path in self.applied:
            applied = json.loads(json.dumps(self.applied[path]))
            disown(applied, data)
            self.applied[path] = applied
            if data.get("spec"):  # the applier's managedFields no longer list those fields
                data = {**data, "metadata": {**(data.get("metadata") or {}),
                                             "managedFields": [{
                    "manager": "iotpipe-operator", "operation": "Apply",
                    "apiVersion": applied.get("apiVersion"), "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(applied)}]}}
                object.__setattr__(request, "data", data)
        return await super()._handle(request)
