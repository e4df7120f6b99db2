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

The package: ``common`` (names, labels, constants, result types, the template context),
``mounts`` (Secrets and ConfigMaps the tiers mount), ``ingest`` (its StatefulSet, autoscaler
and drain Job), ``tiers`` (middle, relay and storage) and ``network`` (the NetworkPolicy);
:func:`build` below puts them together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from iotpipe_operator import crd
from iotpipe_operator import spec as typed_spec
from iotpipe_operator.builders.common import (
    CONFIG_HASH_ANNOTATION,
    INGEST_DATA_DIR,
    METRICS_PORT,
    PIPELINE_LABEL,
    PMEM_STORAGE_CLASS,
    SCRAPE_LABEL,
    STORAGE_DATA_DIR,
    TIERS,
    WORKLOAD_KINDS,
    BuildResult,
    ClusterCapabilities,
    ObjectRef,
    Problem,
    drain_job_name,
    endpoints_configmap_name,
    endpoints_data,
    ingest_pod_name,
    ingest_pvc_name,
    labels_for,
    pvc_request,
    render_template,
    selector_for,
    workload_name,
)
from iotpipe_operator.builders.ingest import add_autoscaler, build_drain_job, ingest_context
from iotpipe_operator.builders.mounts import curve_secret, deny_list_configmap, pipeline_mounts
from iotpipe_operator.builders.network import build_network_policy
from iotpipe_operator.builders.tiers import middle_context, relay_context, storage_context
from iotpipe_operator.names import Names

__all__ = [
    "CONFIG_HASH_ANNOTATION", "INGEST_DATA_DIR", "METRICS_PORT", "PIPELINE_LABEL",
    "PMEM_STORAGE_CLASS", "STORAGE_DATA_DIR", "TIERS", "WORKLOAD_KINDS", "BuildResult",
    "ClusterCapabilities", "ObjectRef", "Problem", "build", "build_drain_job",
    "build_network_policy", "curve_secret", "drain_job_name", "ingest_pod_name",
    "ingest_pvc_name", "labels_for", "pvc_request", "selector_for", "workload_name",
]

_NO_OPTIONAL_APIS = ClusterCapabilities()  # neither KEDA nor the ServiceMonitor CRD


def build(pipeline: Mapping[str, Any],
          caps: ClusterCapabilities = _NO_OPTIONAL_APIS) -> BuildResult:
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
    mounts = pipeline_mounts(name, spec)
    t_ingest = ingest_context(name, spec, caps, mounts, result)
    t_middle = middle_context(name, spec, mounts)
    t_relay = relay_context(name, namespace, spec, mounts)
    t_storage = storage_context(name, spec, mounts)

    base = {"namespace": namespace, "image": spec["image"],
            "pull_policy": spec["imagePullPolicy"],
            "pull_secrets": [{"name": s} for s in spec.get("imagePullSecrets") or []]}
    result.create_only.append(deny_list_configmap(name, namespace))
    if spec["security"]["curve"]["enabled"]:
        result.curve_secret = Names(name).curve_secret()
    result.children += render_template(
        "configmap.yaml.j2", t={"config_name": endpoints_configmap_name(name),
                                "labels": labels_for(name, "endpoints"),
                                "config": endpoints_data(name, namespace,
                                                         spec["middle"]["replicas"])},
        **base)
    for t in (t_ingest, t_middle, t_relay, t_storage):
        result.children += render_template("configmap.yaml.j2", t=t, **base)
        template = "deployment.yaml.j2" if t is t_relay else "statefulset.yaml.j2"
        result.children += render_template(template, t=t, **base)
        result.children += render_template("service.yaml.j2", t=t, **base)
        result.children += render_template("pdb.yaml.j2", t=t, **base)
    add_autoscaler(name, namespace, spec, caps, t_ingest, base, result)

    policy_ref = ObjectRef("networking.k8s.io/v1", "NetworkPolicy", name)
    if spec["networkPolicy"]["enabled"]:
        result.children.append(build_network_policy(name, namespace, spec["networkPolicy"]))
    else:
        result.absent.append(policy_ref)

    monitor_ref = ObjectRef("monitoring.coreos.com/v1", "ServiceMonitor", name)
    if spec["metrics"]["serviceMonitor"] and caps.service_monitor:
        result.children += render_template(
            "servicemonitor.yaml.j2", name=name, namespace=namespace,
            labels=labels_for(name, "metrics"), interval=spec["metrics"]["interval"],
            scrape_selector={PIPELINE_LABEL: name, SCRAPE_LABEL: "true"})
    elif caps.service_monitor:
        result.absent.append(monitor_ref)
    return result
