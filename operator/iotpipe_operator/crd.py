"""The IoTPipeline CustomResourceDefinition, built in one place.

``crds/iotpipelines.yaml`` is the rendered output of :func:`build_crd` (``iotpipe-operator
crd > crds/iotpipelines.yaml``); a test keeps the two identical, and the Helm chart copies the
file. The operator also uses the schema at run time: :func:`apply_defaults` fills the
schema's defaults into a spec, so a builder sees the same spec whether or not an API server
(which defaults on admission) stood in between.

Validation decisions:

- Queue sizes are Kubernetes quantity strings (``"10Gi"``). The "may only grow" rule uses
  the Kubernetes CEL quantity library (``quantity(self).compareTo(quantity(oldSelf)) >= 0``,
  Kubernetes >= 1.29); the tests evaluate the same rule with cel-python plus a small
  ``quantity`` extension that follows the Kubernetes semantics.
- A queue's storage class is immutable (``volumeClaimTemplates`` of a StatefulSet cannot
  change): a transition rule on the queue object compares presence and value with oldSelf.
- Sink URLs: one rule names the known schemes, then one rule per scheme checks its shape.
- Names are limited to 40 characters so every child name (``<name>-ingest-headless``,
  ``<name>-ingest-drain-<ordinal>``, pod names with controller hashes) fits a DNS label.
"""

from __future__ import annotations

import copy
from typing import Any

GROUP = "iotpipe.dev"
VERSION = "v1alpha1"
PLURAL = "iotpipelines"
KIND = "IoTPipeline"
API_VERSION = f"{GROUP}/{VERSION}"

DELETION_POLICIES = ("Drain", "Retain", "Delete")

QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"

# Sink URL shapes: scheme -> (regex, human description), as iotpipe.storage.sinks parses them.
SINK_SCHEMES: dict[str, tuple[str, str]] = {
    "sqlite": (r"^sqlite:///[^?# ]+$", "sqlite:///ABSOLUTE/PATH.db"),
    "parquet": (r"^parquet:///[^?# ]+$", "parquet:///ABSOLUTE/DIR"),
    "akumuli": (r"^akumuli://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$", "akumuli://HOST[:PORT]"),
    "victoriametrics": (
        r"^victoriametrics://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$",
        "victoriametrics://HOST[:PORT]",
    ),
}


def _int(default: int | None, minimum: int, maximum: int, description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "integer", "minimum": minimum, "maximum": maximum, "description": description,
    }
    if default is not None:
        schema["default"] = default
    return schema


def _open_object(description: str) -> dict[str, Any]:
    return {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
            "description": description}


def _volume(default_size: str, what: str) -> dict[str, Any]:
    return {
        "type": "object",
        "default": {},
        "description": f"The persistent volume of the {what} (one PVC per pod, retained).",
        "properties": {
            "size": {
                "type": "string", "default": default_size, "maxLength": 32,
                "pattern": QUANTITY_PATTERN,
                "description": f"Capacity of the {what} in bytes (a quantity, e.g. 10Gi). May "
                               "only grow. The PVC requests this plus 10% (at least 64Mi) "
                               "headroom for segment preallocation and the cursor ledger.",
                "x-kubernetes-validations": [{
                    "rule": "quantity(self).compareTo(quantity(oldSelf)) >= 0",
                    "message": "size may only grow (a queue volume can be expanded, "
                               "never shrunk)",
                }],
            },
            "storageClassName": {
                "type": "string", "maxLength": 253,
                "description": "StorageClass of the PVCs; immutable. Use pmem-csi-sc-ext4 "
                               "(PMEM-CSI, DAX) on nodes with persistent memory; any class "
                               "works. Unset: the cluster default.",
            },
            "accessMode": {
                "type": "string", "enum": ["ReadWriteOnce", "ReadWriteOncePod"],
                "default": "ReadWriteOnce",
                "description": "ReadWriteOncePod (CSI drivers only) guarantees that a drain "
                               "Job and a re-created pod never mount a queue together.",
            },
        },
        "x-kubernetes-validations": [{
            "rule": "has(self.storageClassName) == has(oldSelf.storageClassName) && "
                    "(!has(self.storageClassName) || "
                    "self.storageClassName == oldSelf.storageClassName)",
            "message": "storageClassName is immutable (StatefulSet volumeClaimTemplates "
                       "cannot change)",
        }],
    }


def _tier_common(replicas: int, description: str, minimum: int = 0) -> dict[str, Any]:
    return {
        "replicas": _int(replicas, minimum, 1000, f"Number of {description} pods."),
        "resources": _open_object("Container resources (requests/limits), as on a Pod."),
        "env": {
            "type": "array", "maxItems": 64,
            "description": "Extra environment variables (EnvVar objects) for the container; "
                           "they override the operator's IOTPIPE_* settings.",
            "items": {"type": "object", "required": ["name"],
                      "x-kubernetes-preserve-unknown-fields": True,
                      "properties": {"name": {"type": "string", "maxLength": 253}}},
        },
    }


def _service(default_port: int) -> dict[str, Any]:
    return {
        "type": "object", "default": {},
        "description": "The client-facing Service.",
        "properties": {
            "type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"],
                     "default": "ClusterIP"},
            "port": _int(default_port, 1, 65535, "Service port."),
            "annotations": {"type": "object", "additionalProperties": {"type": "string"},
                            "description": "Annotations for the Service (cloud LBs)."},
        },
    }


def _tls(tier: str, path: str) -> dict[str, Any]:
    return {
        "type": "object", "default": {},
        "description": f"TLS on the {tier} WebSocket ({path}): wss:// served by the tier "
                       "itself, for deployments without a TLS-terminating ingress.",
        "properties": {
            "secretName": {
                "type": "string", "maxLength": 253,
                "description": "A kubernetes.io/tls Secret (tls.crt, tls.key), e.g. made by "
                               "cert-manager. Mounted as a volume: a renewed certificate "
                               "reaches new connections without a restart. Unset: plain "
                               "ws://.",
            },
        },
    }


def _spec_schema() -> dict[str, Any]:
    sink_rules: list[dict[str, Any]] = [{
        "rule": "self.matches('^(" + "|".join(SINK_SCHEMES) + "):')",
        "message": "sink URL has an unknown scheme (known: "
                   + ", ".join(f"{s}:" for s in SINK_SCHEMES) + ")",
    }]
    for scheme, (regex, shape) in SINK_SCHEMES.items():
        sink_rules.append({
            "rule": f"!self.startsWith('{scheme}:') || self.matches('{regex}')",
            "message": f"{scheme} sink URL is not well formed: expected {shape}",
        })
    ingest = {
        "type": "object", "default": {},
        "description": "The WebSocket ingest tier (StatefulSet, one queue per pod).",
        "properties": {
            **_tier_common(2, "ingest"),
            "replicas": _int(2, 0, 1000, "Number of ingest pods (also the scale subresource). "
                                         "Ignored while autoscaling.mode is hpa or keda."),
            "processes": _int(1, 1, 64, "Ingest processes per pod (SO_REUSEPORT, one per "
                                        "core), each with its own queue and node id."),
            "queue": _volume("1Gi", "ingest queue"),
            "service": _service(8080),
            "auth": {
                "type": "object", "default": {},
                "description": "Device/client token secret (HS256), shared with the relay.",
                "properties": {
                    "secretName": {"type": "string", "maxLength": 253},
                    "secretKey": {"type": "string", "default": "secret", "maxLength": 253},
                    "insecureNoAuth": {"type": "boolean", "default": False},
                },
                "x-kubernetes-validations": [{
                    "rule": "self.insecureNoAuth || has(self.secretName)",
                    "message": "ingest.auth.secretName is required unless insecureNoAuth "
                               "is true",
                }],
            },
            "rateLimit": {"type": "number", "minimum": 0,
                          "description": "Messages per second per device (0: no limit; "
                                         "unset: the ingest default)."},
            "maxFrameBytes": _int(None, 128, 64 * 1024 * 1024, "Largest WebSocket frame."),
            "tls": _tls("ingest", "devices"),
            "autoscaling": {
                "type": "object", "default": {},
                "description": "Autoscaling of ingest: an HPA or a KEDA ScaledObject, never "
                               "both. When active, the StatefulSet's replicas is left unset.",
                "properties": {
                    "mode": {"type": "string", "enum": ["none", "hpa", "keda"],
                             "default": "none"},
                    "minReplicas": _int(2, 1, 1000, "Lower bound."),
                    "maxReplicas": _int(10, 1, 1000, "Upper bound."),
                    "targetCPUUtilizationPercentage": _int(70, 1, 100, "CPU target."),
                    "targetConnectionsPerPod": _int(
                        None, 1, 1_000_000,
                        "Target iotpipe_ingest_connections per pod (KEDA prometheus trigger; "
                        "with mode hpa a Pods metric that needs a custom metrics adapter)."),
                    "scaleDown": {
                        "type": "object", "default": {},
                        "description": "Scale-down behaviour: slow, each removed pod drains.",
                        "properties": {
                            "stabilizationWindowSeconds": _int(300, 0, 3600, "Window."),
                            "podsPerPeriod": _int(1, 1, 100, "Pods removed per period."),
                            "periodSeconds": _int(120, 1, 1800, "Period."),
                        },
                    },
                    "keda": {
                        "type": "object", "default": {},
                        "properties": {
                            "prometheusServerAddress": {
                                "type": "string", "maxLength": 512,
                                "default": "http://prometheus-operated.monitoring.svc:9090",
                            },
                            "pollingInterval": _int(30, 1, 3600, "Seconds."),
                            "cooldownPeriod": _int(300, 0, 86400, "Seconds."),
                        },
                    },
                },
                "x-kubernetes-validations": [{
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
                }],
            },
            "drain": {
                "type": "object", "default": {},
                "description": "Graceful drain on pod termination and scale-down.",
                "properties": {
                    "graceSeconds": _int(120, 5, 86400, "Time a pod gets to close devices "
                                                        "and forward its queue."),
                    "preStopSeconds": _int(5, 0, 300, "Delay before SIGTERM so endpoints "
                                                      "stop sending new connections."),
                    "jobBackoffLimit": _int(6, 0, 100, "Retries of a scale-down drain Job."),
                },
            },
        },
    }
    middle = {
        "type": "object", "default": {},
        "description": "The ZeroMQ fan-in tier (StatefulSet, sharded: ingest nodes fail "
                       "over across all middle pods).",
        # At least one: ingest, relay and storage exit when they have no middle endpoint.
        "properties": {**_tier_common(2, "middle", minimum=1),
                       "queue": _volume("4Gi", "middle log")},
        # A removed middle pod's log may still hold records that storage has not consumed;
        # nothing drains it (ingest has drain Jobs, the middle has none), so refuse it.
        "x-kubernetes-validations": [{
            "rule": "!has(oldSelf.replicas) || !has(self.replicas) "
                    "|| self.replicas >= oldSelf.replicas",
            "message": "middle.replicas may not decrease: a removed middle pod's log may "
                       "still hold records that storage has not consumed",
        }],
    }
    relay = {
        "type": "object", "default": {},
        "description": "The live WebSocket relay (Deployment, stateless).",
        "properties": {
            **_tier_common(1, "relay"),
            "clientQueue": _int(1000, 1, 1_000_000, "Per-client bounded send queue length."),
            "service": _service(8081),
            "tls": _tls("relay", "client apps and the live page"),
        },
    }
    storage = {
        "type": "object", "default": {},
        "description": "The storage consumers (StatefulSet) writing to sinks.",
        "properties": {
            **_tier_common(1, "storage"),
            "queue": _volume("1Gi", "storage data directory (embedded sinks)"),
            "group": {"type": "string", "default": "storage", "maxLength": 63,
                      "pattern": "^[a-z0-9][a-z0-9_-]*$",
                      "description": "Consumer group on the middle feed."},
            "sinks": {
                "type": "array", "maxItems": 16, "minItems": 1,
                "default": ["sqlite:///var/lib/iotpipe/store/readings.db"],
                "description": "Sink URLs, written in parallel.",
                "items": {"type": "string", "maxLength": 1024,
                          "x-kubernetes-validations": sink_rules},
            },
            "registry": {
                "type": "object",
                "description": "ConfigMap holding the device registry YAML.",
                "required": ["configMapName"],
                "properties": {
                    "configMapName": {"type": "string", "maxLength": 253},
                    "key": {"type": "string", "default": "registry.yaml", "maxLength": 253},
                },
            },
        },
    }
    return {
        "type": "object", "default": {},
        "properties": {
            "image": {"type": "string", "default": "ghcr.io/iotpipe/iotpipe:0.1.0",
                      "maxLength": 512, "description": "The workload image (all tiers)."},
            "imagePullPolicy": {"type": "string", "default": "IfNotPresent",
                                "enum": ["Always", "IfNotPresent", "Never"]},
            "imagePullSecrets": {"type": "array", "maxItems": 16,
                                 "items": {"type": "string", "maxLength": 253}},
            "paused": {"type": "boolean", "default": False,
                       "description": "Reconcile nothing; only report status."},
            "deletionPolicy": {
                "type": "string", "enum": list(DELETION_POLICIES), "default": "Drain",
                "description": "What deleting the IoTPipeline does. Drain: ingest goes to "
                               "zero through the normal drain, then the operator waits until "
                               "every middle log and the storage feed are empty before the "
                               "children go. Retain: children go, queue PVCs stay (recreate "
                               "the pipeline with the same name to resume). Delete: children "
                               "go at once (queued data on retained PVCs is not forwarded)."},
            "networkPolicy": {
                "type": "object", "default": {},
                "description": "A NetworkPolicy admitting to each ZeroMQ port only this "
                               "pipeline's own tiers, and to the WebSocket and metrics "
                               "ports the peers listed here (unset: from anywhere).",
                "properties": {
                    "enabled": {"type": "boolean", "default": True},
                    "webSocketFrom": {
                        "type": "array", "maxItems": 32,
                        "description": "NetworkPolicyPeers allowed to the ingest and relay "
                                       "WebSocket ports; unset: from anywhere.",
                        "items": _open_object("A NetworkPolicyPeer.")},
                    "metricsFrom": {
                        "type": "array", "maxItems": 32,
                        "description": "NetworkPolicyPeers allowed to the metrics port "
                                       "(Prometheus, the operator); unset: from anywhere.",
                        "items": _open_object("A NetworkPolicyPeer.")},
                },
            },
            "security": {
                "type": "object", "default": {},
                "description": "Security between the tiers (docs/security.md).",
                "properties": {
                    "curve": {
                        "type": "object", "default": {},
                        "description": "CurveZMQ on every ZeroMQ link: the operator creates "
                                       "the Secret <name>-curve with a key pair per role "
                                       "once and mounts it in every tier and drain Job; "
                                       "it rotates the keys when rotation changes "
                                       "(docs/security.md).",
                        "properties": {
                            "enabled": {"type": "boolean", "default": True,
                                        "description": "false: plain ZeroMQ (only where "
                                                       "the network is private to the "
                                                       "pipeline)."},
                            "rotation": {
                                "type": "string", "maxLength": 63,
                                "description": "Any string; when it changes, the operator "
                                               "rotates every CurveZMQ key pair without "
                                               "losing an acknowledged message: next keys, "
                                               "wait until every middle admits them, "
                                               "promote and roll the tiers, retire the old "
                                               "keys (status.curveRotation and the "
                                               "condition CurveKeysRotated; "
                                               "docs/security.md)."},
                        },
                    },
                },
            },
            "metrics": {
                "type": "object", "default": {},
                "properties": {
                    "serviceMonitor": {"type": "boolean", "default": False,
                                       "description": "Create a ServiceMonitor when the "
                                                      "monitoring.coreos.com CRD exists."},
                    "interval": {"type": "string", "default": "30s", "maxLength": 16,
                                 "pattern": "^[0-9]+(ms|s|m|h)$"},
                },
            },
            "ingest": ingest,
            "middle": middle,
            "relay": relay,
            "storage": storage,
        },
    }


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict (rendered to crds/iotpipelines.yaml)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": "iotpipeline",
                      "listKind": f"{KIND}List", "shortNames": ["iotp"]},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.ingest.replicas",
                              "statusReplicasPath": ".status.ingest.replicas",
                              "labelSelectorPath": ".status.ingest.selector"},
                },
                "additionalPrinterColumns": [
                    {"name": "Ready", "type": "string",
                     "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                    {"name": "Ingest", "type": "string", "jsonPath": ".status.ingest.summary",
                     "description": "Ready/desired ingest pods"},
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "An IoT ingestion pipeline: ingest, middle, relay, storage.",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": _spec_schema(),
                        "status": {"type": "object",
                                   "x-kubernetes-preserve-unknown-fields": True},
                    },
                    "x-kubernetes-validations": [{
                        "rule": "size(self.metadata.name) <= 40",
                        "message": "metadata.name must be at most 40 characters (child "
                                   "object names append suffixes)",
                    }],
                }},
            }],
        },
    }


def spec_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Return a copy of ``value`` with structural-schema defaults filled in, as the API
    server does: a property's default applies when its parent object exists."""
    value = copy.deepcopy(value)
    return _default_into(schema, value)


def _default_into(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _default_into(sub, value[name])
    elif isinstance(value, list) and "items" in schema:
        return [_default_into(schema["items"], item) for item in value]
    return value


def defaulted_spec(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The spec with every schema default filled in."""
    return apply_defaults(spec_schema(), dict(spec or {}))
