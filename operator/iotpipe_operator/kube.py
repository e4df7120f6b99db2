"""A thin, generic Kubernetes API client on top of the official ``kubernetes`` package.

Objects are plain dicts (what the builders produce). :meth:`Kube.apply` is server-side
apply with the field manager ``iotpipe-operator``, so a field the spec no longer says
disappears from the live object. It reads the object first: a missing one is created by an
apply too (KMock answers 404 to a PATCH of a missing object: then a POST with the same field
manager), an existing one not owned by the pipeline is refused
(:class:`ForeignObjectError`, never adopted), and a 409 conflict re-reads and re-applies.
Transient API errors (unreachable, 429, 5xx) are retried a few times with exponential
backoff inside one call. Everything here is blocking; the kopf handlers run it in kopf's
thread pool (sync handlers).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import kubernetes
import urllib3
from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException

# kind -> plural for every kind the operator touches.
PLURALS: dict[str, str] = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
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

FIELD_MANAGER = "iotpipe-operator"
TRANSIENT_STATUSES = (0, 429, 500, 502, 503, 504)

# Fields the API server refuses to change on update; applied with their live values (the
# builders produce the same values for them, except a grown volumeClaimTemplate, whose PVCs
# the operator expands directly). Leaving them out would make SSA remove them.
IMMUTABLE_SPEC_FIELDS: dict[str, tuple[str, ...]] = {
    "StatefulSet": ("volumeClaimTemplates", "serviceName", "selector", "podManagementPolicy"),
    "Deployment": ("selector",),
    "Job": ("selector", "template"),
}


class KubeError(Exception):
    """An API call failed; ``status`` is the HTTP status (0 when unreachable)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class ForeignObjectError(KubeError):
    """An object with a child's name exists but is not owned by this pipeline: refused."""

    def __init__(self, kind: str, name: str, owners: list[str]) -> None:
        owned_by = f"owned by {', '.join(owners)}" if owners else "not owned by any object"
        super().__init__(409, "NotOwned", f"{kind}/{name} exists and is {owned_by}; the "
                                          "operator does not adopt it (delete or rename it)")
        self.kind = kind
        self.name = name


@dataclass(frozen=True)
class ApplyOutcome:
    action: str  # "created" or "applied"
    obj: dict[str, Any]


def owned_by(obj: dict[str, Any], owner_uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner_uid for ref in refs)


def apply_body(obj: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    """The apply configuration: ``obj`` without status, immutable fields set to their live
    values (SSA would otherwise try to change or remove them)."""
    body = copy.deepcopy({key: value for key, value in obj.items() if key != "status"})
    immutable = IMMUTABLE_SPEC_FIELDS.get(obj["kind"], ())
    live_spec = (live or {}).get("spec") or {}
    if immutable and "spec" in body:
        for key in immutable:
            if key in live_spec:
                body["spec"][key] = copy.deepcopy(live_spec[key])
    return body


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
        # Set by close(): handler threads still retrying give up at once, so a stopping
        # operator never waits out their timeouts and backoffs.
        self._closed = threading.Event()

    @classmethod
    def from_environment(cls, timeout: float = 30.0) -> Kube:
        """In-cluster service account if present, else $KUBECONFIG / ~/.kube/config."""
        configuration = Configuration()
        try:
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        except kubernetes.config.ConfigException:
            # Read $KUBECONFIG now: the kubernetes package reads it once at import time.
            kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"),
                                               client_configuration=configuration)
        return cls(ApiClient(configuration), timeout=timeout)

    def close(self) -> None:
        self._closed.set()
        # Drop keep-alive connections too, so the server side sees them end now.
        self.api.rest_client.pool_manager.clear()
        self.api.close()

    def request(self, method: str, path: str, body: Any = None,
                query: dict[str, str] | None = None,
                content_type: str = "application/json", attempts: int = 4) -> dict[str, Any]:
        """One API call; transient failures are retried with exponential backoff
        (0.2 s, 0.4 s, 0.8 s) before the error is raised."""
        for attempt in range(attempts):
            if self._closed.is_set():
                raise KubeError(0, "Closed", f"{method} {path}: the operator is stopping")
            try:
                return self._request_once(method, path, body, query, content_type)
            except KubeError as exc:
                if exc.status not in TRANSIENT_STATUSES or attempt == attempts - 1:
                    raise
                self._backoff(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def _backoff(self, seconds: float) -> None:
        self._closed.wait(seconds)  # close() cuts it short

    def _request_once(self, method: str, path: str, body: Any,
                      query: dict[str, str] | None, content_type: str) -> dict[str, Any]:
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
        except (OSError, urllib3.exceptions.HTTPError) as exc:  # reset, timeout, refused
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

    def served(self, api_version: str, kind: str) -> bool | None:
        """Whether the API server serves this kind (e.g. KEDA's CRD is installed); None
        when discovery failed (a 503 from an aggregated API is "unknown", not "absent")."""
        try:
            payload = self.request("GET", f"/apis/{api_version}", attempts=2)
        except KubeError as exc:
            if exc.status == 404:
                return False
            return None
        return any(r.get("name") == PLURALS[kind] for r in payload.get("resources", []))

    def pod_metrics(self, namespace: str, pod: dict[str, Any], port: int,
                    direct: bool = False) -> str:
        """A pod's Prometheus text: through the API server's pod proxy (needs
        ``pods/proxy`` get), or directly from the pod IP (needs the network path)."""
        name = pod["metadata"]["name"]
        if direct:
            ip = (pod.get("status") or {}).get("podIP")
            if not ip:
                raise KubeError(0, "NoPodIP", f"pod {name} has no IP yet")
            host = f"[{ip}]" if ":" in ip else ip
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/metrics",
                                            timeout=self.timeout) as response:
                    return str(response.read().decode(errors="replace"))
            except OSError as exc:
                raise KubeError(0, "Unreachable", f"{name}: {exc}") from exc
        path = f"/api/v1/namespaces/{quote(namespace)}/pods/{quote(name)}:{port}/proxy/metrics"
        serialized = self.api.param_serialize(
            method="GET", resource_path=path, header_params={"Accept": "text/plain"},
            auth_settings=["BearerToken"])
        try:
            response = self.api.call_api(*serialized, _request_timeout=self.timeout)
            response.read()
        except ApiException as exc:
            raise KubeError(exc.status or 0, str(exc.reason), str(exc.body)) from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise KubeError(0, "Unreachable", str(exc)) from exc
        text = response.data.decode(errors="replace") if response.data else ""
        if not 200 <= response.status < 300:
            raise KubeError(response.status, "ProxyFailed", f"{name}: {text[:200]}")
        return text

    # --- writes ----------------------------------------------------------------------
    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request("POST", resource_path(obj["apiVersion"], obj["kind"],
                                                  meta.get("namespace")), body=obj,
                            query={"fieldManager": FIELD_MANAGER})

    def create_if_absent(self, obj: dict[str, Any]) -> bool:
        """Create ``obj`` unless an object of that name exists (then it is left exactly as
        it is: never read, patched or adopted). True when this call created it."""
        try:
            self.create(obj)
        except KubeError as exc:
            if exc.status == 409:  # AlreadyExists
                return False
            raise
        return True

    def patch(self, api_version: str, kind: str, namespace: str, name: str,
              body: dict[str, Any], subresource: str | None = None) -> dict[str, Any]:
        return self.request("PATCH",
                            resource_path(api_version, kind, namespace, name, subresource),
                            body=body, content_type="application/merge-patch+json")

    def server_side_apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return self.request(
            "PATCH", resource_path(obj["apiVersion"], obj["kind"], meta.get("namespace", ""),
                                   meta["name"]),
            body=obj, query={"fieldManager": FIELD_MANAGER, "force": "true"},
            content_type="application/apply-patch+yaml")  # JSON is YAML

    def _create_by_apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create through server-side apply, so every field is owned by the Apply entry of
        the field manager (a POST would record an Update entry that keeps owning the fields,
        and removing them from the spec later would then not remove them). A server that
        answers 404 to an apply of a missing object (KMock) gets a POST instead."""
        try:
            return self.server_side_apply(apply_body(obj, None))
        except KubeError as exc:
            if exc.status != 404:
                raise
        return self.create(obj)

    def apply(self, obj: dict[str, Any], owner_uid: str | None = None,
              attempts: int = 3,
              from_live: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
              ) -> ApplyOutcome:
        """Create ``obj`` or server-side apply it; refuse an existing object that is not
        owned by ``owner_uid`` (when given). A conflict (409) or an object deleted in
        between re-reads and re-applies. ``from_live(body, live)`` sets fields of the
        apply body from the object as read just before the apply."""
        meta = obj["metadata"]
        namespace = meta.get("namespace", "")
        last: KubeError | None = None
        for _ in range(attempts):
            live = self.get(obj["apiVersion"], obj["kind"], namespace, meta["name"])
            try:
                if live is None:
                    return ApplyOutcome("created", self._create_by_apply(obj))
                if owner_uid is not None and not owned_by(live, owner_uid):
                    owners = [f"{r.get('kind')}/{r.get('name')}" for r in
                              (live.get("metadata") or {}).get("ownerReferences") or []]
                    raise ForeignObjectError(obj["kind"], meta["name"], owners)
                body = apply_body(obj, live)
                if from_live is not None:
                    from_live(body, live)
                return ApplyOutcome("applied", self.server_side_apply(body))
            except ForeignObjectError:
                raise
            except KubeError as exc:
                if exc.status not in (404, 409):
                    raise
                last = exc  # created or deleted by someone else meanwhile: read again
        assert last is not None
        raise last

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
