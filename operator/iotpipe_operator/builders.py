"""Pure builders: an IoTPipeline (dict) in, the child manifests (dicts) out.

In the style of CloudNativePG's ``pkg/specs``: no I/O, no cluster, the same input always
gives the same objects. The manifests themselves live in Jinja2 templates
(``templates/*.yaml.j2``), readable by anyone who knows Helm; this module computes the
values (names, labels, tier settings, the config hash) and parses the rendered YAML.

What is built, for a pipeline named ``NAME``:

- ingest: ConfigMap ``NAME-ingest-config``, StatefulSet ``NAME-ingest`` (queue PVC per pod,
  ``persistentVolumeClaimRetentionPolicy`` Retain, preStop delay and a grace period that
  covers the drain), headless Service ``NAME-ingest-headless``, client Service
  ``NAME-ingest``, PDB; plus an HPA or a KEDA ScaledObject (``NAME-ingest``), never both.
  When autoscaled, ``replicas`` is left out of the StatefulSet so the operator never
  fights the autoscaler.
- middle: ConfigMap, StatefulSet ``NAME-middle`` (log PVC per pod), headless Service
  ``NAME-middle`` (pod DNS ``NAME-middle-<i>.NAME-middle``, the ingest/relay/storage
  endpoints), PDB.
- relay: ConfigMap, Deployment ``NAME-relay``, headless ``NAME-relay-headless`` (metrics)
  and client Service ``NAME-relay``, PDB.
- storage: ConfigMap, StatefulSet ``NAME-storage`` (data PVC per pod), headless Service
  ``NAME-storage``, PDB.
- a ServiceMonitor ``NAME`` when ``metrics.serviceMonitor`` is on and its CRD exists.
- created once, never applied (:attr:`BuildResult.create_only`, :attr:`BuildResult.curve_secret`):
  the deny list ConfigMap ``NAME-deny-list`` (mounted in ingest and relay) and, with
  ``security.curve.enabled``, the CurveZMQ Secret ``NAME-curve`` (mounted in every tier and
  drain Job; its random keys come from the handler). Optional ``ingest.tls`` /
  ``relay.tls`` Secrets are mounted for ``wss://``. Storage serves its read API and the
  relay's live page is pointed at it and at every tier's metrics.

Volume sizing: ``queue.size`` is the pod's total queue capacity; with ``ingest.processes``
= N each process gets ``size // N`` bytes (``queue_bytes``). The PVC requests ``size``
plus 10% (at least 64Mi) for segment preallocation and the cursor ledger.

Every pod template carries ``iotpipe.dev/config-hash``: a hash of the tier's ConfigMap data,
extra env, resources and mounted references, so a configuration change rolls the pods
(the ConfigMap is consumed through ``envFrom``, which alone would not restart anything).
The registry ConfigMap's *content* is not hashed: a mounted ConfigMap updates in place.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jinja2
import yaml

from iotpipe_operator import contract, crd
from iotpipe_operator import spec as typed_spec
from iotpipe_operator.names import QUEUE_CLAIM, Names
from iotpipe_operator.quantity import format_mebibytes, quantity_bytes

TIERS = ("ingest", "middle", "relay", "storage")
INGEST_DATA_DIR = "/var/lib/iotpipe/queue"
MIDDLE_DATA_DIR = "/var/lib/iotpipe/log"
STORAGE_DATA_DIR = "/var/lib/iotpipe/store"
REGISTRY_DIR = "/etc/iotpipe/registry"
AUTH_DIR = "/etc/iotpipe/auth"
ENDPOINTS_DIR = "/etc/iotpipe/endpoints"
CURVE_DIR = "/etc/iotpipe/curve"
TLS_DIR = "/etc/iotpipe/tls"
DENY_DIR = "/etc/iotpipe/deny"
DENY_KEY = "deny.yaml"
EMPTY_DENY_LIST = (
    "# Revoked devices, client apps and single tokens (jti); ingest and relay re-read this\n"
    "# within seconds and close connections it now refuses (docs/security.md).\n"
    "# The operator created this ConfigMap and never changes it: edit it freely.\n"
    "devices: []\nclients: []\ntoken_ids: []\n")
SECRET_MODE = 0o440  # owner and fsGroup (the tiers run as 10001:10001) read; nobody writes
CURVE_SERVER_ROLE = "middle"
CURVE_CLIENT_ROLES = {"ingest": "ingest", "relay": "relay", "storage": "storage",
                      "drain": "ingest"}  # tier -> its CurveZMQ role
ROUTER_PORT, PUB_PORT, FEED_PORT = contract.ROUTER_PORT, contract.PUB_PORT, contract.FEED_PORT
INGEST_PORT, RELAY_PORT = contract.INGEST_PORT, contract.RELAY_PORT
METRICS_PORT = contract.METRICS_PORT
CONFIG_HASH_ANNOTATION = "iotpipe.dev/config-hash"
PIPELINE_LABEL = "iotpipe.dev/pipeline"
TIER_LABEL = "iotpipe.dev/tier"
ORDINAL_LABEL = "iotpipe.dev/ordinal"
SCRAPE_LABEL = "iotpipe.dev/scrape"
MANAGED_BY = "iotpipe-operator"
PMEM_STORAGE_CLASS = "pmem-csi-sc-ext4"  # documented preset: PMEM-CSI, ext4 with DAX


@dataclass(frozen=True)
class ClusterCapabilities:
    """Optional APIs the cluster serves (found by discovery; render assumes what it is told).
    None: unknown (discovery failed and nothing was known before): the builders then neither
    create nor remove that kind's objects, and ingest keeps its live replicas."""

    keda: bool | None = False
    service_monitor: bool | None = False


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class Problem:
    """A spec the cluster cannot honour; reported as condition Degraded with this reason."""

    reason: str
    message: str
    retry: bool = False  # an API failure: retried with backoff, not a spec problem


@dataclass
class BuildResult:
    children: list[dict[str, Any]] = field(default_factory=list)
    absent: list[ObjectRef] = field(default_factory=list)  # must not exist (mode switches)
    problems: list[Problem] = field(default_factory=list)
    # The ingest replicas the spec asks for; None: the autoscaler's (or unknown) so the
    # live value stays. The operator steps down to it, one drained ordinal at a time.
    ingest_replicas: int | None = None
    # Created when absent and never patched afterwards (users edit them): the deny list.
    create_only: list[dict[str, Any]] = field(default_factory=list)
    # The CurveZMQ Secret the pods mount; its random keys are generated by the handler
    # (once), never by these pure builders. None: CurveZMQ is off.
    curve_secret: str | None = None

    def find(self, kind: str, name: str) -> dict[str, Any]:
        for child in self.children:
            if child["kind"] == kind and child["metadata"]["name"] == name:
                return child
        raise KeyError(f"no {kind} {name!r} among the built children")


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("iotpipe_operator", "templates"),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # YAML, not HTML
    )


def render_template(template: str, **context: Any) -> list[dict[str, Any]]:
    """Render one template and parse its YAML documents."""
    text = _environment().get_template(template).render(**context)
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:  # a template bug, never user input: show the text
        raise RuntimeError(f"template {template} rendered invalid YAML: {exc}\n{text}") from exc
    return [doc for doc in docs if doc]


def labels_for(name: str, tier: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "iotpipe",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": tier,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        PIPELINE_LABEL: name,
        TIER_LABEL: tier,
    }


def selector_for(name: str, tier: str) -> dict[str, str]:
    return {PIPELINE_LABEL: name, TIER_LABEL: tier}


def workload_name(name: str, tier: str) -> str:
    return Names(name).workload(tier)


def ingest_pod_name(name: str, ordinal: int) -> str:
    return Names(name).pod("ingest", ordinal)


def ingest_pvc_name(name: str, ordinal: int) -> str:
    """The PVC the StatefulSet controller creates from the volumeClaimTemplate."""
    return Names(name).pvc("ingest", ordinal)


def drain_job_name(name: str, ordinal: int) -> str:
    return Names(name).drain_job(ordinal)


def middle_endpoints(name: str, replicas: int, port: int, namespace: str = "default"
                     ) -> list[str]:
    return [f"tcp://{name}-middle-{i}.{name}-middle.{namespace}.svc:{port}"
            for i in range(replicas)]


def endpoints_configmap_name(name: str) -> str:
    return Names(name).endpoints()


def endpoints_data(name: str, namespace: str, middle_replicas: int) -> dict[str, str]:
    """The endpoints ConfigMap's data (contract 1): one endpoint per line per socket kind.
    Mounted whole (not subPath) so a change reaches running pods without a restart."""
    return {key: "".join(f"{e}\n" for e in middle_endpoints(name, middle_replicas, port,
                                                            namespace))
            for key, port in (("router", ROUTER_PORT), ("pub", PUB_PORT), ("feed", FEED_PORT))}


def _endpoints_mount(name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volume = {"name": "endpoints", "configMap": {"name": endpoints_configmap_name(name)}}
    mount = {"name": "endpoints", "mountPath": ENDPOINTS_DIR, "readOnly": True}
    return [volume], [mount]


Mounts = tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]


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


def storage_history_urls(name: str, namespace: str, replicas: int) -> list[str]:
    """Every storage pod's read API (its metrics port): each holds the readings of the
    feed partitions it consumed, and the relay merges their answers."""
    return [f"http://{name}-storage-{i}.{name}-storage.{namespace}.svc:{METRICS_PORT}"
            for i in range(replicas)]


def health_urls(name: str, namespace: str) -> list[str]:
    """One metrics URL per tier for the live page's health panel: the tier's headless
    Service, i.e. whichever pod its DNS names first."""
    services = {"ingest": f"{name}-ingest-headless", "middle": f"{name}-middle",
                "storage": f"{name}-storage"}
    return [f"{tier}=http://{service}.{namespace}.svc:{METRICS_PORT}/metrics"
            for tier, service in services.items()]


def config_hash(*parts: Any) -> str:
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def pvc_request(size: str) -> str:
    raw = quantity_bytes(size)
    return format_mebibytes(raw + max(64 * 2**20, raw // 10))


def ingest_queue_bytes(spec: Mapping[str, Any]) -> int:
    """Queue capacity of one ingest process: the pod's queue size split across processes."""
    return quantity_bytes(spec["ingest"]["queue"]["size"]) // spec["ingest"]["processes"]


def autoscaler_active(spec: Mapping[str, Any], caps: ClusterCapabilities) -> bool:
    mode = spec["ingest"]["autoscaling"]["mode"]
    return mode == "hpa" or (mode == "keda" and caps.keda)


def _volume(tier_spec: Mapping[str, Any], mount: str) -> dict[str, Any]:
    queue = tier_spec["queue"]
    return {
        "claim": QUEUE_CLAIM,
        "mount": mount,
        "request": pvc_request(queue["size"]),
        "storage_class": queue.get("storageClassName"),
        "access_mode": queue["accessMode"],
    }


def _registry_mount(spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                      dict[str, str]]:
    registry = spec["storage"].get("registry")
    if not registry:
        return [], [], {}
    volume = {"name": "registry", "configMap": {
        "name": registry["configMapName"],
        "items": [{"key": registry["key"], "path": "registry.yaml"}]}}
    mount = {"name": "registry", "mountPath": REGISTRY_DIR, "readOnly": True}
    return [volume], [mount], {"REGISTRY_FILE": f"{REGISTRY_DIR}/registry.yaml"}


def _auth_mount(spec: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                  dict[str, str]]:
    auth = spec["ingest"]["auth"]
    if not auth.get("secretName"):
        return [], [], {}
    volume = {"name": "auth", "secret": {
        "secretName": auth["secretName"],
        "items": [{"key": auth["secretKey"], "path": "secret"}]}}
    mount = {"name": "auth", "mountPath": AUTH_DIR, "readOnly": True}
    return [volume], [mount], {"IOTPIPE_AUTH_SECRET_FILE": f"{AUTH_DIR}/secret"}


def _prefixed(tier: str, settings: Mapping[str, Any]) -> dict[str, str]:
    """Tier settings as the tier's env vars, named by its settings model (the contract)."""
    out: dict[str, str] = {}
    for key, value in settings.items():
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        out[key if key.startswith("IOTPIPE_") else contract.env(tier, key.lower())] = text
    return out


def _tier_context(name: str, tier: str, spec: Mapping[str, Any], config: dict[str, str], *,
                  replicas: int | None, args: list[str], ports: list[dict[str, Any]],
                  volume: dict[str, Any] | None, extra_volumes: list[dict[str, Any]],
                  extra_mounts: list[dict[str, Any]], headless_name: str,
                  service: Mapping[str, Any] | None = None, grace_seconds: int = 30,
                  pre_stop_seconds: int = 0, publish_not_ready: bool = False,
                  resources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    tier_spec = spec[tier]
    env = list(tier_spec.get("env") or [])
    resources = dict(resources if resources is not None else (tier_spec.get("resources") or {}))
    labels = labels_for(name, tier)
    return {
        "tier": tier,
        "name": workload_name(name, tier),
        "labels": labels,
        "scrape_labels": {**labels, SCRAPE_LABEL: "true"},
        "selector": selector_for(name, tier),
        "config_name": Names(name).config(tier),
        "config": config,
        "config_hash": config_hash(config, env, resources, extra_volumes, spec["image"],
                                   spec["imagePullPolicy"]),
        "replicas": replicas,
        "args": args,
        "ports": ports,
        "env": env,
        "resources": resources,
        "volume": volume,
        "extra_volumes": extra_volumes,
        "extra_mounts": extra_mounts,
        "headless_name": headless_name,
        "service": dict(service) if service else None,
        "grace_seconds": grace_seconds,
        "pre_stop_seconds": pre_stop_seconds,
        "publish_not_ready": publish_not_ready,
    }


def _behavior(autoscaling: Mapping[str, Any]) -> dict[str, Any]:
    down = autoscaling["scaleDown"]
    return {
        # Scale down slowly: every removed ingest pod closes its devices and drains.
        "scaleDown": {
            "stabilizationWindowSeconds": down["stabilizationWindowSeconds"],
            "selectPolicy": "Min",
            "policies": [{"type": "Pods", "value": down["podsPerPeriod"],
                          "periodSeconds": down["periodSeconds"]}],
        },
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [{"type": "Pods", "value": 4, "periodSeconds": 60},
                         {"type": "Percent", "value": 100, "periodSeconds": 60}],
        },
    }


def build(pipeline: Mapping[str, Any],
          caps: ClusterCapabilities = ClusterCapabilities()) -> BuildResult:
    """Every child object of ``pipeline`` (no owner references: the caller adopts them)."""
    meta = pipeline.get("metadata") or {}
    name = meta.get("name")
    if not name:
        raise ValueError("IoTPipeline has no metadata.name")
    namespace = meta.get("namespace") or "default"
    # The typed model refuses a malformed spec with the field's name (a ValueError) before
    # anything is built, e.g. one that reached the operator without the CRD's schema.
    typed_spec.parse(pipeline.get("spec"))
    spec = crd.defaulted_spec(pipeline.get("spec"))
    result = BuildResult()

    ingest, middle, relay, storage = (spec[t] for t in TIERS)
    autoscaling = ingest["autoscaling"]
    mode = autoscaling["mode"]
    registry_volumes, registry_mounts, registry_env = _registry_mount(spec)
    auth_volumes, auth_mounts, auth_env = _auth_mount(spec)
    endpoint_volumes, endpoint_mounts = _endpoints_mount(name)
    deny_volumes, deny_mounts, deny_env = deny_list_mount(name)
    curve = {tier: curve_mount(name, spec, tier) for tier in TIERS}
    tls = {tier: tls_mount(spec[tier]) for tier in ("ingest", "relay")}
    # Binding stays 0.0.0.0 (the tiers' default) so an env var can still set --host.
    common = {"METRICS_PORT": METRICS_PORT, "LOG_LEVEL": "info"}

    # --- ingest -------------------------------------------------------------------------
    processes = ingest["processes"]
    drain = ingest["drain"]
    ingest_config = _prefixed("ingest", {
        **common,
        "PORT": INGEST_PORT,
        "DATA_DIR": INGEST_DATA_DIR,
        "QUEUE_BYTES": ingest_queue_bytes(spec),
        "PROCESSES": processes,
        "MIDDLE_ENDPOINTS_FILE": f"{ENDPOINTS_DIR}/router",
        "INSECURE_NO_AUTH": ingest["auth"]["insecureNoAuth"],
        "RATE_LIMIT": ingest.get("rateLimit"),
        "MAX_FRAME_BYTES": ingest.get("maxFrameBytes"),
        "DRAIN_TIMEOUT": drain["graceSeconds"],
        **auth_env, **curve["ingest"][2], **tls["ingest"][2], **deny_env,
    })
    ingest_resources = ingest.get("resources") or {}
    if mode != "none" and not ingest_resources:
        # CPU utilisation targets are relative to requests: without them an HPA cannot act.
        ingest_resources = {"requests": {"cpu": f"{500 * processes}m", "memory": "256Mi"}}
    scaled = autoscaler_active(spec, caps)
    if mode == "keda" and caps.keda is False:
        result.problems.append(Problem(
            "KedaNotInstalled",
            "autoscaling.mode is keda but the keda.sh/v1alpha1 ScaledObject API is not "
            "served; install KEDA. Ingest runs at autoscaling.minReplicas meanwhile."))
    if mode == "keda" and caps.keda is None:
        result.problems.append(Problem(
            "DiscoveryFailed", "could not tell whether KEDA's ScaledObject API is served; "
                               "ingest keeps its live replicas until discovery answers",
            retry=True))
    keda_unknown = mode == "keda" and caps.keda is None
    ingest_replicas = None if (scaled or keda_unknown) else (
        autoscaling["minReplicas"] if mode == "keda" else ingest["replicas"])
    result.ingest_replicas = ingest_replicas
    t_ingest = _tier_context(
        name, "ingest", spec, ingest_config, replicas=ingest_replicas, args=["ingest"],
        ports=[{"name": "ws", "port": INGEST_PORT}], volume=_volume(ingest, INGEST_DATA_DIR),
        extra_volumes=auth_volumes + endpoint_volumes + curve["ingest"][0] + tls["ingest"][0]
        + deny_volumes,
        extra_mounts=auth_mounts + endpoint_mounts + curve["ingest"][1] + tls["ingest"][1]
        + deny_mounts,
        headless_name=f"{name}-ingest-headless",
        service=ingest["service"],
        # preStop delay + the drain itself + a margin for the forwarder's last round trip
        grace_seconds=drain["preStopSeconds"] + drain["graceSeconds"] + 15,
        pre_stop_seconds=drain["preStopSeconds"], resources=ingest_resources)

    # --- middle -------------------------------------------------------------------------
    middle_config = _prefixed("middle", {
        **common, "ROUTER_PORT": ROUTER_PORT, "PUB_PORT": PUB_PORT,
        "FEED_PORT": FEED_PORT,
        "DATA_DIR": MIDDLE_DATA_DIR, "LOG_BYTES": quantity_bytes(middle["queue"]["size"]),
        "CONSUMER_GROUPS": storage["group"], **curve["middle"][2],
    })
    t_middle = _tier_context(
        name, "middle", spec, middle_config, replicas=middle["replicas"], args=["middle"],
        ports=[{"name": "router", "port": ROUTER_PORT}, {"name": "pub", "port": PUB_PORT},
               {"name": "feed", "port": FEED_PORT}],
        volume=_volume(middle, MIDDLE_DATA_DIR), extra_volumes=curve["middle"][0],
        extra_mounts=curve["middle"][1],
        # Ingest pods must resolve every middle pod before it is ready (ZeroMQ reconnects).
        headless_name=f"{name}-middle", publish_not_ready=True, grace_seconds=60)

    # --- relay --------------------------------------------------------------------------
    relay_config = _prefixed("relay", {
        **common, "PORT": RELAY_PORT, "MIDDLE_PUB_ENDPOINTS_FILE": f"{ENDPOINTS_DIR}/pub",
        "CLIENT_QUEUE": relay["clientQueue"], **registry_env, **auth_env,
        # clients authenticate with the same secret as devices, or not at all
        "INSECURE_NO_AUTH": ingest["auth"]["insecureNoAuth"],
        # the live page: device history from storage's read API, tier health from metrics
        "HISTORY_URLS": ",".join(storage_history_urls(name, namespace, storage["replicas"]))
        or None,
        "HEALTH_URLS": ",".join(health_urls(name, namespace)),
        **curve["relay"][2], **tls["relay"][2], **deny_env,
    })
    t_relay = _tier_context(
        name, "relay", spec, relay_config, replicas=relay["replicas"], args=["relay"],
        ports=[{"name": "ws", "port": RELAY_PORT}], volume=None,
        extra_volumes=auth_volumes + registry_volumes + endpoint_volumes + curve["relay"][0]
        + tls["relay"][0] + deny_volumes,
        extra_mounts=auth_mounts + registry_mounts + endpoint_mounts + curve["relay"][1]
        + tls["relay"][1] + deny_mounts,
        headless_name=f"{name}-relay-headless", service=relay["service"], grace_seconds=30)

    # --- storage ------------------------------------------------------------------------
    storage_config = _prefixed("storage", {
        **common, "FEED_ENDPOINTS_FILE": f"{ENDPOINTS_DIR}/feed", "GROUP": storage["group"],
        "SINKS": ",".join(storage["sinks"]), "DATA_DIR": STORAGE_DATA_DIR, **registry_env,
        "READ_API": True,  # the relay's live page reads device history from it
        **curve["storage"][2],
    })
    t_storage = _tier_context(
        name, "storage", spec, storage_config, replicas=storage["replicas"], args=["storage"],
        ports=[], volume=_volume(storage, STORAGE_DATA_DIR),
        extra_volumes=registry_volumes + endpoint_volumes + curve["storage"][0],
        extra_mounts=registry_mounts + endpoint_mounts + curve["storage"][1],
        headless_name=f"{name}-storage",
        grace_seconds=60)

    base = {"namespace": namespace, "image": spec["image"],
            "pull_policy": spec["imagePullPolicy"],
            "pull_secrets": [{"name": s} for s in spec.get("imagePullSecrets") or []]}
    result.create_only.append(deny_list_configmap(name, namespace))
    if spec["security"]["curve"]["enabled"]:
        result.curve_secret = Names(name).curve_secret()
    result.children += render_template(
        "configmap.yaml.j2", t={"config_name": endpoints_configmap_name(name),
                                "labels": labels_for(name, "endpoints"),
                                "config": endpoints_data(name, namespace, middle["replicas"])},
        **base)
    for t in (t_ingest, t_middle, t_relay, t_storage):
        result.children += render_template("configmap.yaml.j2", t=t, **base)
        template = "deployment.yaml.j2" if t is t_relay else "statefulset.yaml.j2"
        result.children += render_template(template, t=t, **base)
        result.children += render_template("service.yaml.j2", t=t, **base)
        result.children += render_template("pdb.yaml.j2", t=t, **base)

    # --- autoscaling: an HPA or a ScaledObject, never both ------------------------------
    hpa_ref = ObjectRef("autoscaling/v2", "HorizontalPodAutoscaler", t_ingest["name"])
    keda_ref = ObjectRef("keda.sh/v1alpha1", "ScaledObject", t_ingest["name"])
    scaling_context = {"t": t_ingest, "autoscaling": autoscaling,
                       "behavior": _behavior(autoscaling), **base}
    if mode == "hpa":
        result.children += render_template("hpa.yaml.j2", **scaling_context)
    else:
        result.absent.append(hpa_ref)
    if mode == "keda" and caps.keda:
        query = (f'sum(iotpipe_ingest_connections{{namespace="{namespace}",'
                 f'pod=~"{name}-ingest-[0-9]+"}})')
        result.children += render_template("scaledobject.yaml.j2", connections_query=query,
                                           **scaling_context)
    elif caps.keda:
        result.absent.append(keda_ref)

    # --- network policy -----------------------------------------------------------------
    policy_ref = ObjectRef("networking.k8s.io/v1", "NetworkPolicy", name)
    if spec["networkPolicy"]["enabled"]:
        result.children.append(build_network_policy(name, namespace, spec["networkPolicy"]))
    else:
        result.absent.append(policy_ref)

    # --- metrics ------------------------------------------------------------------------
    monitor_ref = ObjectRef("monitoring.coreos.com/v1", "ServiceMonitor", name)
    if spec["metrics"]["serviceMonitor"] and caps.service_monitor:
        result.children += render_template(
            "servicemonitor.yaml.j2", name=name, namespace=namespace,
            labels=labels_for(name, "metrics"), interval=spec["metrics"]["interval"],
            scrape_selector={PIPELINE_LABEL: name, SCRAPE_LABEL: "true"})
    elif caps.service_monitor:
        result.absent.append(monitor_ref)
    return result


def build_network_policy(name: str, namespace: str, policy: Mapping[str, Any]
                         ) -> dict[str, Any]:
    """One NetworkPolicy for the pipeline's pods: each ZeroMQ port admits only the tier of
    this pipeline that uses it (ingest and drain Jobs -> router, relay -> pub, storage ->
    feed), so nothing else in the cluster can inject records that bypass device tokens; the
    WebSocket and metrics ports admit the configured peers (unset: anyone), the metrics
    port also this pipeline's relay (the live page's health panel and device history)."""
    def tier_peer(tier: str) -> dict[str, Any]:
        return {"podSelector": {"matchLabels": selector_for(name, tier)}}

    def open_rule(ports: list[int], peers: list[Any] | None) -> dict[str, Any]:
        rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": p} for p in ports]}
        if peers:  # no "from": every source (an empty list would admit nothing)
            rule["from"] = list(peers)
        return rule

    ingress = [
        {"ports": [{"protocol": "TCP", "port": ROUTER_PORT}],
         "from": [tier_peer("ingest"), tier_peer("ingest-drain")]},
        {"ports": [{"protocol": "TCP", "port": PUB_PORT}], "from": [tier_peer("relay")]},
        {"ports": [{"protocol": "TCP", "port": FEED_PORT}], "from": [tier_peer("storage")]},
        open_rule([INGEST_PORT, RELAY_PORT], policy.get("webSocketFrom")),
        # the relay's live page reads every tier's metrics and storage's read API there
        open_rule([METRICS_PORT], [*policy["metricsFrom"], tier_peer("relay")]
                  if policy.get("metricsFrom") else None),
    ]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": labels_for(name, "network")},
        "spec": {"podSelector": {"matchLabels": {PIPELINE_LABEL: name}},
                 "policyTypes": ["Ingress"], "ingress": ingress},
    }


def build_drain_job(pipeline: Mapping[str, Any], ordinal: int) -> dict[str, Any]:
    """The Job that forwards the retained queue of ingest pod ``ordinal`` to the middle tier."""
    meta = pipeline["metadata"]
    name = meta["name"]
    spec = crd.defaulted_spec(pipeline.get("spec"))
    labels = {**labels_for(name, "ingest-drain"), ORDINAL_LABEL: str(ordinal)}
    def flag(field: str) -> str:
        return contract.flag("drain", field)

    args = ["drain", flag("data_dir"), INGEST_DATA_DIR,
            flag("node_id"), ingest_pod_name(name, ordinal),
            flag("middle_endpoints_file"), f"{ENDPOINTS_DIR}/router",
            flag("timeout"), str(spec["ingest"]["drain"]["graceSeconds"]),
            # open the queues with the capacity the pod had (per process)
            flag("queue_bytes"), str(ingest_queue_bytes(spec))]
    curve_volumes, curve_mounts, curve_env = curve_mount(name, spec, "drain")
    if curve_env:
        args += [flag("curve_keys_dir"), curve_env["CURVE_KEYS_DIR"]]
    (job,) = render_template(
        "drain-job.yaml.j2", namespace=meta.get("namespace") or "default",
        job_name=drain_job_name(name, ordinal), labels=labels,
        backoff_limit=spec["ingest"]["drain"]["jobBackoffLimit"], image=spec["image"],
        pull_policy=spec["imagePullPolicy"],
        pull_secrets=[{"name": s} for s in spec.get("imagePullSecrets") or []],
        args=args, data_dir=INGEST_DATA_DIR, claim_name=ingest_pvc_name(name, ordinal),
        endpoints_dir=ENDPOINTS_DIR, endpoints_configmap=endpoints_configmap_name(name),
        extra_volumes=curve_volumes, extra_mounts=curve_mounts)
    return job
