"""Every API access the operator makes, as Kubernetes RBAC PolicyRules.

The Helm chart renders its ClusterRole from :data:`OPERATOR_RULES` (``rules_yaml()``), so a
new child kind added to the builders must be added here too (a test checks that every kind
the builders emit is covered). kopf's own framework needs (CRD and namespace watching) are
in :data:`FRAMEWORK_RULES`.
"""

from __future__ import annotations

from typing import Any

import yaml

_WRITE = ["get", "list", "watch", "create", "patch", "update", "delete"]

# Namespaced access: bind cluster-wide, or per watched namespace with RoleBindings.
OPERATOR_RULES: list[dict[str, list[str]]] = [
    # the custom resource: watch it, patch kopf's annotations/finalizers, write status
    {"apiGroups": ["iotpipe.dev"], "resources": ["iotpipelines"],
     "verbs": ["get", "list", "watch", "patch", "update"]},
    {"apiGroups": ["iotpipe.dev"], "resources": ["iotpipelines/status"],
     "verbs": ["get", "patch", "update"]},
    # children carry blockOwnerDeletion: clusters that enforce OwnerReferencesPermission-
    # Enforcement require update on the owner's finalizers subresource
    {"apiGroups": ["iotpipe.dev"], "resources": ["iotpipelines/finalizers"],
     "verbs": ["update"]},
    # children created and patched from the builders
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": _WRITE},
    {"apiGroups": ["apps"], "resources": ["statefulsets", "deployments"], "verbs": _WRITE},
    {"apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": _WRITE},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": _WRITE},
    {"apiGroups": ["autoscaling"], "resources": ["horizontalpodautoscalers"], "verbs": _WRITE},
    {"apiGroups": ["keda.sh"], "resources": ["scaledobjects"], "verbs": _WRITE},
    {"apiGroups": ["monitoring.coreos.com"], "resources": ["servicemonitors"],
     "verbs": _WRITE},
    # the CurveZMQ keys Secret: created once when absent; read and patched only while
    # spec.security.curve.rotation asks for a key rotation (no list/watch: the operator
    # reads no Secret but that one, by name)
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get", "patch"]},
    # scale-down drains: Jobs mount retained queue PVCs; drained PVCs are deleted;
    # queue growth patches the PVC requests
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": _WRITE},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"],
     "verbs": ["get", "list", "watch", "patch", "delete"]},
    # status: which ingest pods still exist
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    # deletionPolicy Drain: queue depths read from the tiers' metrics through the pod proxy
    {"apiGroups": [""], "resources": ["pods/proxy"], "verbs": ["get"]},
    # Kubernetes events on condition transitions (kopf posts core/v1 events)
    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]

# Cluster-scoped access kopf itself needs.
FRAMEWORK_RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
]


def rules_yaml(rules: list[dict[str, Any]] | None = None) -> str:
    """The rules as a YAML list, ready to drop under a ClusterRole's ``rules:``."""
    return yaml.safe_dump(OPERATOR_RULES if rules is None else rules, sort_keys=False)


def allows(api_group: str, resource: str, verb: str) -> bool:
    return any(api_group in rule["apiGroups"] and resource in rule["resources"]
               and verb in rule["verbs"] for rule in OPERATOR_RULES)
