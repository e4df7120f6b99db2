"""The ingest tier: its StatefulSet's context, its autoscaler (an HPA or a KEDA
ScaledObject, never both) and the drain Job of a removed ordinal's retained queue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iotpipe_operator import contract, crd
from iotpipe_operator.builders.common import (
    COMMON_SETTINGS,
    ENDPOINTS_DIR,
    INGEST_DATA_DIR,
    INGEST_PORT,
    ORDINAL_LABEL,
    BuildResult,
    ClusterCapabilities,
    ObjectRef,
    Problem,
    autoscaler_active,
    drain_job_name,
    endpoints_configmap_name,
    ingest_pod_name,
    ingest_pvc_name,
    ingest_queue_bytes,
    labels_for,
    queue_volume,
    render_template,
    tier_context,
    tier_env,
)
from iotpipe_operator.builders.mounts import PipelineMounts, curve_mount


def ingest_context(name: str, spec: Mapping[str, Any], caps: ClusterCapabilities,
                   mounts: PipelineMounts, result: BuildResult) -> dict[str, Any]:
    """The ingest StatefulSet's template context; sets ``result.ingest_replicas`` and adds
    the autoscaling problems."""
    ingest = spec["ingest"]
    mode = ingest["autoscaling"]["mode"]
    processes = ingest["processes"]
    drain = ingest["drain"]
    curve, tls = mounts.curve["ingest"], mounts.tls["ingest"]
    config = tier_env("ingest", {
        **COMMON_SETTINGS,
        "PORT": INGEST_PORT,
        "DATA_DIR": INGEST_DATA_DIR,
        "QUEUE_BYTES": ingest_queue_bytes(spec),
        "PROCESSES": processes,
        "MIDDLE_ENDPOINTS_FILE": f"{ENDPOINTS_DIR}/router",
        "INSECURE_NO_AUTH": ingest["auth"]["insecureNoAuth"],
        "RATE_LIMIT": ingest.get("rateLimit"),
        "MAX_FRAME_BYTES": ingest.get("maxFrameBytes"),
        "DRAIN_TIMEOUT": drain["graceSeconds"],
        **mounts.auth[2], **curve[2], **tls[2], **mounts.deny[2],
    })
    resources = ingest.get("resources") or {}
    if mode != "none" and not resources:
        # CPU utilisation targets are relative to requests: without them an HPA cannot act.
        resources = {"requests": {"cpu": f"{500 * processes}m", "memory": "256Mi"}}
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
    replicas = None if (scaled or keda_unknown) else (
        ingest["autoscaling"]["minReplicas"] if mode == "keda" else ingest["replicas"])
    result.ingest_replicas = replicas
    return tier_context(
        name, "ingest", spec, config, replicas=replicas, args=["ingest"],
        ports=[{"name": "ws", "port": INGEST_PORT}],
        volume=queue_volume(ingest, INGEST_DATA_DIR),
        extra_volumes=mounts.auth[0] + mounts.endpoints[0] + curve[0] + tls[0]
        + mounts.deny[0],
        extra_mounts=mounts.auth[1] + mounts.endpoints[1] + curve[1] + tls[1]
        + mounts.deny[1],
        headless_name=f"{name}-ingest-headless",
        service=ingest["service"],
        # preStop delay + the drain itself + a margin for the forwarder's last round trip
        grace_seconds=drain["preStopSeconds"] + drain["graceSeconds"] + 15,
        pre_stop_seconds=drain["preStopSeconds"], resources=resources)


def add_autoscaler(name: str, namespace: str, spec: Mapping[str, Any],
                   caps: ClusterCapabilities, t_ingest: Mapping[str, Any],
                   base: Mapping[str, Any], result: BuildResult) -> None:
    """The HPA or the ScaledObject the mode asks for; the other one must be absent."""
    autoscaling = spec["ingest"]["autoscaling"]
    mode = autoscaling["mode"]
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
