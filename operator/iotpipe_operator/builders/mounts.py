"""The volumes the tiers mount (Secrets and ConfigMaps), with the settings that point the
tier at them, and the create-only objects behind two of them (deny list, CurveZMQ keys)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from iotpipe_operator.builders.common import (
    AUTH_DIR,
    CURVE_CLIENT_ROLES,
    CURVE_DIR,
    CURVE_SERVER_ROLE,
    DENY_DIR,
    DENY_KEY,
    EMPTY_DENY_LIST,
    ENDPOINTS_DIR,
    REGISTRY_DIR,
    SECRET_MODE,
    TIERS,
    TLS_DIR,
    endpoints_configmap_name,
    labels_for,
)
from iotpipe_operator.names import Names

Mounts = tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]


def endpoints_mount(name: str) -> Mounts:
    volume = {"name": "endpoints", "configMap": {"name": endpoints_configmap_name(name)}}
    mount = {"name": "endpoints", "mountPath": ENDPOINTS_DIR, "readOnly": True}
    return [volume], [mount], {}


def curve_mount(name: str, spec: Mapping[str, Any], tier: str) -> Mounts:
    """The pipeline's CurveZMQ Secret as a volume (no subPath: a rotation step reaches the
    running middle without a restart). The middle gets every file (it admits every role's
    current and next public key); a client tier only its own key pair and the middle's
    public key, so an ingest pod never holds the relay's or storage's secret key."""
    if not spec["security"]["curve"]["enabled"]:
        return [], [], {}
    secret: dict[str, Any] = {"secretName": Names(name).curve_secret(),
                              "defaultMode": SECRET_MODE}
    if tier != CURVE_SERVER_ROLE:
        role = CURVE_CLIENT_ROLES[tier]
        secret["items"] = [{"key": k, "path": k} for k in
                           (f"{role}.key_secret", f"{CURVE_SERVER_ROLE}.key")]
    volume = {"name": "curve", "secret": secret}
    mount = {"name": "curve", "mountPath": CURVE_DIR, "readOnly": True}
    return [volume], [mount], {"CURVE_KEYS_DIR": CURVE_DIR}


def curve_secret(name: str, namespace: str, files: Mapping[str, bytes]) -> dict[str, Any]:
    """The CurveZMQ Secret holding ``files`` (as written by ``iotpipe keys generate``)."""
    return {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": Names(name).curve_secret(), "namespace": namespace,
                     "labels": labels_for(name, "curve")},
        "data": {key: base64.b64encode(value).decode() for key, value in sorted(files.items())},
    }


def tls_mount(tier_spec: Mapping[str, Any]) -> Mounts:
    """A kubernetes.io/tls Secret (cert-manager's) as a volume: a renewed pair replaces the
    files in place and the tier loads it for new connections."""
    secret_name = (tier_spec.get("tls") or {}).get("secretName")
    if not secret_name:
        return [], [], {}
    volume = {"name": "tls", "secret": {
        "secretName": secret_name, "defaultMode": SECRET_MODE,
        "items": [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]}}
    mount = {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}
    return [volume], [mount], {"TLS_CERT": f"{TLS_DIR}/tls.crt", "TLS_KEY": f"{TLS_DIR}/tls.key"}


def deny_list_mount(name: str) -> Mounts:
    volume = {"name": "deny-list", "configMap": {
        "name": Names(name).deny_list(), "items": [{"key": DENY_KEY, "path": DENY_KEY}]}}
    mount = {"name": "deny-list", "mountPath": DENY_DIR, "readOnly": True}
    return [volume], [mount], {"DENY_LIST_FILE": f"{DENY_DIR}/{DENY_KEY}"}


def deny_list_configmap(name: str, namespace: str) -> dict[str, Any]:
    """The deny list as first created: empty. Only ever created, never applied: the
    operator owning ``data`` would reset every edit."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": Names(name).deny_list(), "namespace": namespace,
                     "labels": labels_for(name, "deny-list")},
        "data": {DENY_KEY: EMPTY_DENY_LIST},
    }



def registry_mount(spec: Mapping[str, Any]) -> Mounts:
    registry = spec["storage"].get("registry")
    if not registry:
        return [], [], {}
    volume = {"name": "registry", "configMap": {
        "name": registry["configMapName"],
        "items": [{"key": registry["key"], "path": "registry.yaml"}]}}
    mount = {"name": "registry", "mountPath": REGISTRY_DIR, "readOnly": True}
    return [volume], [mount], {"REGISTRY_FILE": f"{REGISTRY_DIR}/registry.yaml"}


def auth_mount(spec: Mapping[str, Any]) -> Mounts:
    auth = spec["ingest"]["auth"]
    if not auth.get("secretName"):
        return [], [], {}
    volume = {"name": "auth", "secret": {
        "secretName": auth["secretName"],
        "items": [{"key": auth["secretKey"], "path": "secret"}]}}
    mount = {"name": "auth", "mountPath": AUTH_DIR, "readOnly": True}
    return [volume], [mount], {"IOTPIPE_AUTH_SECRET_FILE": f"{AUTH_DIR}/secret"}


@dataclass(frozen=True)
class PipelineMounts:
    """Every volume a tier of one pipeline may mount; each tier takes the ones it uses."""

    registry: Mounts
    auth: Mounts
    endpoints: Mounts
    deny: Mounts
    curve: dict[str, Mounts]  # per tier: a client tier gets only its own key pair
    tls: dict[str, Mounts]  # ingest and relay (wss://)


def pipeline_mounts(name: str, spec: Mapping[str, Any]) -> PipelineMounts:
    return PipelineMounts(
        registry=registry_mount(spec), auth=auth_mount(spec), endpoints=endpoints_mount(name),
        deny=deny_list_mount(name), curve={tier: curve_mount(name, spec, tier) for tier in TIERS},
        tls={tier: tls_mount(spec[tier]) for tier in ("ingest", "relay")})
