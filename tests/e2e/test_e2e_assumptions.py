"""What the kind e2e tests take for granted, checked without a cluster.

The kind tests cannot run on every machine, so the names, ports, labels and paths they rely
on are checked here against the real sources (the operator's builders, the CRD, the chart
and the Dockerfiles): when one of those changes, this fails in CI instead of the e2e run
failing somewhere with a cluster.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from support import kind as e2e

from iotpipe_operator import builders

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def children() -> list[dict[str, Any]]:
    return list(builders.build(e2e.pipeline_manifest()).children)


def find(children: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [c for c in children if c["kind"] == kind and c["metadata"]["name"] == name]
    assert len(matches) == 1, f"the operator builds no single {kind} {name}"
    return matches[0]


def container_of(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def test_e2e_pipeline_manifest_is_valid_for_the_crd() -> None:
    crd = yaml.safe_load((REPO / "crds" / "iotpipelines.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    manifest = e2e.pipeline_manifest()
    jsonschema.validate(manifest, version["schema"]["openAPIV3Schema"])
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    # `kubectl scale iotpipeline/...` drives the ingest replicas through this subresource.
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.ingest.replicas"


def test_workloads_use_the_loaded_image_and_the_images_user(
        children: list[dict[str, Any]]) -> None:
    dockerfile = (REPO / "Dockerfile.workload").read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    for kind, tier in (("StatefulSet", "ingest"), ("StatefulSet", "middle"),
                       ("Deployment", "relay"), ("StatefulSet", "storage")):
        workload = find(children, kind, f"{e2e.PIPELINE}-{tier}")
        container = container_of(workload)
        assert container["image"] == e2e.WORKLOAD_IMAGE
        assert container["imagePullPolicy"] == "IfNotPresent"  # loaded by kind, not pulled
        pod_security = workload["spec"]["template"]["spec"]["securityContext"]
        assert (str(pod_security["runAsUser"]), str(pod_security["runAsGroup"])) == user


def test_ingest_service_and_pods_are_where_the_devices_connect(
        children: list[dict[str, Any]]) -> None:
    service = find(children, "Service", f"{e2e.PIPELINE}-ingest")
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8080
    ingest = find(children, "StatefulSet", f"{e2e.PIPELINE}-ingest")
    container = container_of(ingest)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[port["targetPort"]] == 8080  # port-forward pod/<ingest> 8080 too
    labels = ingest["spec"]["template"]["metadata"]["labels"]
    assert labels["iotpipe.dev/pipeline"] == e2e.PIPELINE
    assert labels["iotpipe.dev/tier"] == "ingest"


def test_ingest_reads_the_auth_secret_the_test_creates(children: list[dict[str, Any]]) -> None:
    secret_name = e2e.pipeline_manifest()["spec"]["ingest"]["auth"]["secretName"]
    ingest = find(children, "StatefulSet", f"{e2e.PIPELINE}-ingest")
    volumes = ingest["spec"]["template"]["spec"]["volumes"]
    secrets = {v["name"]: v["secret"] for v in volumes if "secret" in v}
    assert secrets["auth"]["secretName"] == secret_name
    # The test creates the Secret with key "secret" (--from-literal=secret=...).
    assert secrets["auth"]["items"][0]["key"] == "secret"
    # Any other Secret is the CurveZMQ keys the operator creates itself.
    assert {s["secretName"] for name, s in secrets.items() if name != "auth"} <= \
        {f"{e2e.PIPELINE}-curve"}
    config = find(children, "ConfigMap", f"{e2e.PIPELINE}-ingest-config")
    assert "IOTPIPE_AUTH_SECRET_FILE" in config["data"]


def test_storage_writes_the_database_the_test_queries(children: list[dict[str, Any]]) -> None:
    storage = find(children, "StatefulSet", f"{e2e.PIPELINE}-storage")
    labels = storage["spec"]["template"]["metadata"]["labels"]
    assert labels["iotpipe.dev/pipeline"] == e2e.PIPELINE
    assert labels["iotpipe.dev/tier"] == "storage"
    config = find(children, "ConfigMap", f"{e2e.PIPELINE}-storage-config")["data"]
    assert f"sqlite://{e2e.STORE_DB}" in config["IOTPIPE_STORAGE_SINKS"].split(",")
    mounts = [m["mountPath"] for m in container_of(storage)["volumeMounts"]]
    assert any(e2e.STORE_DB.startswith(mount + "/") for mount in mounts), mounts


def test_operator_deployment_name_and_labels_match_the_chart() -> None:
    helm = pytest.importorskip("helm_python")
    with helm.Chart.load(e2e.CHART) as chart:
        rendered = chart.render(name=e2e.RELEASE, namespace=e2e.OPERATOR_NAMESPACE)
    deployment = yaml.safe_load(rendered["iotpipe-operator/templates/deployment.yaml"])
    assert deployment["metadata"]["name"] == e2e.operator_name()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "iotpipe-operator"
    assert e2e.OPERATOR_IMAGE.rsplit(":", 1)[0] == \
        deployment["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[0]
