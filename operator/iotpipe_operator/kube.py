"""A thin, generic Kubernetes API client on top of the official ``kubernetes`` package.

Objects are plain dicts (what the builders produce). Creation is POST, and an existing
object (409) is updated with a JSON merge patch: that works against every API server and
against KMock, which answers 404 to a PATCH of a missing object (so server-side apply
cannot stand in for create there). Everything here is blocking; the kopf handlers run it
in kopf's thread pool (sync handlers).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

# kind -> plural for every kind the operator touches.
PLURALS: dict[str, str] = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Pod": "pods",
    "StatefulSet": "statefulsets",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "Job": "jobs",
    "ScaledObject": "scaledobjects",
    "ServiceMonitor": "servicemonitors",
    "IoTPipeline": "iotpipelines",
    "NetworkPolicy": "networkpolicies",
}

# Fields the API server refuses to change on update; left out of patches (the builders
# always produce the same values for them, except a grown volumeClaimTemplate, whose PVCs
# the operator expands directly).
IMMUTABLE_SPEC_FIELDS: dict[str, tuple[str, ...]] = {
    "StatefulSet": ("volumeClaimTemplates", "serviceName", "selector", "podManagementPolicy"),
    "Deployment": ("selector",),
    "Job": ("selector", "template"),
}


# Kinds whose merge patch is computed against the live object (see patch_body).
NEEDS_LIVE_STATE = ("ConfigMap", "Service")


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status (0 when unreachable)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ApplyOutcome:
    action: str  # "created" or "patched"
    obj: dict[str, Any]


def resource_path(api_version: str, kind: str, namespace: str | None,
                  name: str | None = None, subresource: str | None = None) -> str:
    if kind not in PLURALS:
        raise ValueError(f"the operator does not manage kind {kind!r}")
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base
    if namespace:
        path += f"/namespaces/{quote(namespace)}"
    path += f"/{PLURALS[kind]}"
    if name:
        path += f"/{quote(name)}"
    if subresource:
        path += f"/{subresource}"
    return path


def _matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


class Kube:
    """Generic CRUD on dict objects; raises :class:`KubeError` with the server's reason."""

    def __init__(self, api_client: ApiClient, timeout: float = 30.0) -> None:
        self.api = api_client
        self.timeout = timeout

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster service account if present, else $KUBECONFIG / ~/.kube/config."""
        configuration = Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            # Read $KUBECONFIG now: the kubernetes package reads it once at import time.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                               client_configuration=configuration)
        return cls(ApiClient(configuration))

    def close(self) -> None:
        # Drop keep-alive connections too, so the server side sees them end now.
        self.api.rest_client.pool_manager.clear()
        self.api.close()

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, str] | None = None,
                content_type: str = "application/json") -> dict[str, Any]:
        url_path = path + (f"?{urlencode(query)}" if query else "")
        headers = {"Accept": "application/json", "Content-Type": content_type}
        serialized = self.api.param_serialize(
            method=method, resource_path=url_path, header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(*serialized, _request_timeout=self.timeout)
            response.read()
        except ApiException as exc:  # raised by the REST layer for transport-level failures
            raise KubeError(exc.status or 0, str(exc.reason), str(exc.body)) from exc
        except OSError as exc:
            raise KubeError(0, "Unreachable", str(exc)) from exc
        text = response.data.decode(errors="replace") if response.data else ""
        try:
            payload: dict[str, Any] = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise KubeError(response.status, "NotJSON",
                            f"{method} {path}: {text[:200]!r}") from exc
        if not 200 <= response.status < 300:
            raise KubeError(response.status, str(payload.get("reason", response.reason)),
                            str(payload.get("message", text[:500])))
        return payload

    # --- reads -----------------------------------------------------------------------
    def get(self, api_version: str, kind: str, namespace: str, name: str
            ) -> dict[str, Any] | None:
        try:
            return self.request("GET", resource_path(api_version, kind, namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: str,
             selector: dict[str, str]) -> list[dict[str, Any]]:
        """Objects whose labels match ``selector`` (filtered here too: some test servers
        ignore labelSelector)."""
        query = {"labelSelector": ",".join(f"{k}={v}" for k, v in sorted(selector.items()))}
        payload = self.request("GET", resource_path(api_version, kind, namespace), query=query)
        return [item for item in payload.get("items", [])
                if _matches((item.get("metadata") or {}).get("labels") or {}, selector)]

    def served(self, api_version: str, kind: str) -> bool:
        """Whether the API server serves this kind (e.g. KEDA's CRD is installed)."""
        try:
            payload = self.request("GET", f"/apis/{api_version}")
        except KubeError as exc:
            if exc.status in (404, 503):
                return False
            raise
        return any(r.get("name") == PLURALS[kind] for r in payload.get("resources", []))

    # --- writes ----------------------------------------------------------------------
    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request("POST", resource_path(obj["apiVersion"], obj["kind"],
                                                  meta.get("namespace")), body=obj)

    def patch(self, api_version: str, kind: str, namespace: str, name: str,
              body: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        return self.request("PATCH",
                            resource_path(api_version, kind, namespace, name, subresource),
                            body=body, content_type="application/merge-patch+json")

    def apply(self, obj: dict[str, Any]) -> ApplyOutcome:
        """Create ``obj``, or merge-patch it to the desired state if it exists."""
        try:
            return ApplyOutcome("created", self.create(obj))
        except KubeError as exc:
            if exc.status != 409:
                raise
        meta = obj["metadata"]
        live = None
        if obj["kind"] in NEEDS_LIVE_STATE:
            live = self.get(obj["apiVersion"], obj["kind"], meta.get("namespace", ""),
                            meta["name"])
        body = patch_body(obj, live)
        return ApplyOutcome("patched", self.patch(obj["apiVersion"], obj["kind"],
                                                  meta.get("namespace", ""), meta["name"], body))

    def delete(self, api_version: str, kind: str, namespace: str, name: str,
               propagation: str = "Background") -> bool:
        """Delete; False if it was already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation}
        try:
            self.request("DELETE", resource_path(api_version, kind, namespace, name), body=body)
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
        return True


def patch_body(obj: dict[str, Any], live: dict[str, Any] | None = None) -> dict[str, Any]:
    """The merge patch that brings ``live`` to ``obj``, without immutable fields.

    A merge patch merges maps and replaces lists, so two kinds need the live object:
    a ConfigMap's keys that are no longer wanted must be nulled (a removed setting must
    not linger), and a Service's ports list must keep the allocated nodePorts (or every
    patch would allocate new ones).
    """
    body = {key: value for key, value in obj.items() if key != "status"}
    immutable = IMMUTABLE_SPEC_FIELDS.get(obj["kind"], ())
    if immutable and "spec" in body:
        body["spec"] = {k: v for k, v in body["spec"].items() if k not in immutable}
    if live is not None and obj["kind"] == "ConfigMap":
        stale = set(live.get("data") or {}) - set(obj.get("data") or {})
        body["data"] = {**(obj.get("data") or {}), **dict.fromkeys(sorted(stale))}
    if live is not None and obj["kind"] == "Service" and "ports" in obj.get("spec", {}):
        allocated = {p.get("name"): p["nodePort"]
                     for p in (live.get("spec") or {}).get("ports") or [] if p.get("nodePort")}
        keeps_node_ports = obj["spec"].get("type") in ("NodePort", "LoadBalancer")
        body["spec"] = {**body["spec"], "ports": [
            {**port, "nodePort": allocated[port.get("name")]}
            if keeps_node_ports and port.get("name") in allocated and "nodePort" not in port
            else port
            for port in obj["spec"]["ports"]]}
    return body
