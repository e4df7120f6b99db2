"""Builders: pure spec -> manifests, validated strictly against Kubernetes schemas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from iotpipe_operator import builders
from iotpipe_operator.builders import BuildResult, ClusterCapabilities

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.yaml"))
K8S_VERSION = kubernetes_validate.utils.latest_version()
ALL_CAPS = ClusterCapabilities(keda=True, service_monitor=True)


def _sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / "samples" / name).read_text())


def _names(result: BuildResult) -> set[tuple[str, str]]:
    return {(c["kind"], c["metadata"]["name"]) for c in result.children}


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_builtin_child_validates_strictly(path: Path) -> None:
    pipeline = yaml.safe_load(path.read_text())
    result = builders.build(pipeline, ALL_CAPS)
    children = [*result.children, builders.build_drain_job(pipeline, 3)]
    # the create-only objects too (the Secret with stand-in files: its keys are random)
    children += [*result.create_only, builders.curve_secret(
        pipeline["metadata"]["name"], pipeline["metadata"].get("namespace", "default"),
        {"middle.key": b"public", "middle.key_secret": b"secret"})]
    builtin = [c for c in children if c["apiVersion"] not in
               ("keda.sh/v1alpha1", "monitoring.coreos.com/v1")]
    assert len(builtin) >= 20
    for child in builtin:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)
    namespace = pipeline["metadata"].get("namespace", "default")
    assert {c["metadata"]["namespace"] for c in children} == {namespace}


def test_minimal_builds_all_tiers() -> None:
    result = builders.build(_sample("minimal.yaml"))
    names = _names(result)
    for kind, name in [("StatefulSet", "demo-ingest"), ("StatefulSet", "demo-middle"),
                       ("StatefulSet", "demo-storage"), ("Deployment", "demo-relay"),
                       ("Service", "demo-ingest"), ("Service", "demo-ingest-headless"),
                       ("Service", "demo-middle"), ("Service", "demo-relay"),
                       ("ConfigMap", "demo-ingest-config"), ("PodDisruptionBudget", "demo-ingest")]:
        assert (kind, name) in names
    kinds = {c["kind"] for c in result.children}
    assert "HorizontalPodAutoscaler" not in kinds and "ScaledObject" not in kinds
    assert result.problems == []
    ingest = result.find("StatefulSet", "demo-ingest")
    assert ingest["spec"]["replicas"] == 2
    assert ingest["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain", "whenScaled": "Retain"}
    claim = ingest["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "queue"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1127Mi"  # 1Gi + 10%
    assert "storageClassName" not in claim["spec"]
    middle = result.find("StatefulSet", "demo-middle")
    assert middle["spec"]["serviceName"] == "demo-middle"
    config = result.find("ConfigMap", "demo-ingest-config")["data"]
    # contract 1: the endpoint list lives in a mounted ConfigMap, not in the pod template
    assert "IOTPIPE_INGEST_MIDDLE_ENDPOINTS" not in config
    assert config["IOTPIPE_INGEST_MIDDLE_ENDPOINTS_FILE"] == "/etc/iotpipe/endpoints/router"
    assert config["IOTPIPE_INGEST_QUEUE_BYTES"] == str(2**30)
    assert config["IOTPIPE_AUTH_SECRET_FILE"] == "/etc/iotpipe/auth/secret"
    assert _container(ingest)["envFrom"] == [{"configMapRef": {"name": "demo-ingest-config"}}]
    storage = result.find("ConfigMap", "demo-storage-config")["data"]
    assert storage["IOTPIPE_STORAGE_FEED_ENDPOINTS_FILE"] == "/etc/iotpipe/endpoints/feed"
    relay = result.find("ConfigMap", "demo-relay-config")["data"]
    assert relay["IOTPIPE_RELAY_MIDDLE_PUB_ENDPOINTS_FILE"] == "/etc/iotpipe/endpoints/pub"
    endpoints = result.find("ConfigMap", "demo-endpoints")["data"]
    assert endpoints == {
        "router": "tcp://demo-middle-0.demo-middle.default.svc:5555\n"
                  "tcp://demo-middle-1.demo-middle.default.svc:5555\n",
        "pub": "tcp://demo-middle-0.demo-middle.default.svc:5556\n"
               "tcp://demo-middle-1.demo-middle.default.svc:5556\n",
        "feed": "tcp://demo-middle-0.demo-middle.default.svc:5557\n"
                "tcp://demo-middle-1.demo-middle.default.svc:5557\n"}
    for kind, workload in [("StatefulSet", "demo-ingest"), ("Deployment", "demo-relay"),
                           ("StatefulSet", "demo-storage")]:
        pod = result.find(kind, workload)["spec"]["template"]["spec"]
        # the whole ConfigMap (no subPath), so an update reaches the running pod
        assert {"name": "endpoints", "configMap": {"name": "demo-endpoints"}} in pod["volumes"]
        assert {"name": "endpoints", "mountPath": "/etc/iotpipe/endpoints",
                "readOnly": True} in pod["containers"][0]["volumeMounts"]
        # contract 4: bind address left to the tiers' default (an env var can still set it)
        assert not any(k.endswith("_HOST") for k in
                       result.find("ConfigMap", f"{workload}-config")["data"])


def test_middle_scale_up_changes_only_the_endpoints_configmap() -> None:
    """Contract 1: no tier rolls when the middle tier grows; only the ConfigMap changes."""
    before = builders.build(_sample("minimal.yaml"))
    bigger = _sample("minimal.yaml")
    bigger["spec"].setdefault("middle", {})["replicas"] = 3
    after = builders.build(bigger)
    for kind, name in [("StatefulSet", "demo-ingest"), ("Deployment", "demo-relay"),
                       ("StatefulSet", "demo-storage")]:
        assert before.find(kind, name)["spec"]["template"] == \
            after.find(kind, name)["spec"]["template"], name
    assert after.find("ConfigMap", "demo-endpoints")["data"]["router"].count("\n") == 3
    assert before.find("ConfigMap", "demo-endpoints") != after.find("ConfigMap",
                                                                     "demo-endpoints")


def test_one_metrics_port_probed_with_startup_probes() -> None:
    result = builders.build(_sample("autoscaled-hpa.yaml"), ALL_CAPS)
    for kind, name in [("StatefulSet", "fleet-ingest"), ("StatefulSet", "fleet-middle"),
                       ("Deployment", "fleet-relay"), ("StatefulSet", "fleet-storage")]:
        container = _container(result.find(kind, name))
        assert [p["containerPort"] for p in container["ports"]
                if p["name"] == "metrics"] == [9100]
        for probe, path in [("startupProbe", "/healthz"), ("readinessProbe", "/readyz"),
                            ("livenessProbe", "/healthz")]:
            assert container[probe]["httpGet"] == {"path": path, "port": "metrics"}, probe


def test_network_policy_admits_zeromq_only_from_own_tiers() -> None:
    pipeline = _sample("minimal.yaml")
    result = builders.build(pipeline)
    policy = result.find("NetworkPolicy", "demo")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"iotpipe.dev/pipeline": "demo"}}
    by_port = {rule["ports"][0]["port"]: rule for rule in policy["spec"]["ingress"]}
    tiers = {port: [peer["podSelector"]["matchLabels"]["iotpipe.dev/tier"]
                    for peer in by_port[port]["from"]] for port in (5555, 5556, 5557)}
    assert tiers == {5555: ["ingest", "ingest-drain"], 5556: ["relay"], 5557: ["storage"]}
    for port in (5555, 5556, 5557):
        for peer in by_port[port]["from"]:
            assert peer["podSelector"]["matchLabels"]["iotpipe.dev/pipeline"] == "demo"
            assert "namespaceSelector" not in peer  # this namespace only
    assert "from" not in by_port[8080], "unset webSocketFrom admits anyone"
    # the spec narrows the WebSocket ports
    peers = [{"namespaceSelector": {"matchLabels": {"team": "edge"}}}]
    pipeline["spec"]["networkPolicy"] = {"webSocketFrom": peers}
    narrowed = builders.build(pipeline).find("NetworkPolicy", "demo")
    ws_rule = next(r for r in narrowed["spec"]["ingress"] if r["ports"][0]["port"] == 8080)
    assert ws_rule["from"] == peers and [p["port"] for p in ws_rule["ports"]] == [8080, 8081]
    pipeline["spec"]["networkPolicy"] = {"enabled": False}
    off = builders.build(pipeline)
    assert "NetworkPolicy" not in {c["kind"] for c in off.children}
    assert builders.ObjectRef("networking.k8s.io/v1", "NetworkPolicy", "demo") in off.absent
    assert result.find("ConfigMap", "demo-middle-config")["data"][
        "IOTPIPE_MIDDLE_LOG_BYTES"] == str(4 * 2**30)


def test_ingest_drain_settings() -> None:
    pipeline = _sample("autoscaled-hpa.yaml")
    ingest = builders.build(pipeline).find("StatefulSet", "fleet-ingest")
    pod = ingest["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 5 + 300 + 15
    assert _container(ingest)["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "5"]
    config = builders.build(pipeline).find("ConfigMap", "fleet-ingest-config")["data"]
    assert config["IOTPIPE_INGEST_DRAIN_TIMEOUT"] == "300"
    assert config["IOTPIPE_INGEST_PROCESSES"] == "2"
    assert config["IOTPIPE_INGEST_QUEUE_BYTES"] == str(2**30 // 2)  # per process


def test_hpa_mode_leaves_replicas_unset_and_builds_hpa() -> None:
    result = builders.build(_sample("autoscaled-hpa.yaml"), ALL_CAPS)
    ingest = result.find("StatefulSet", "fleet-ingest")
    assert "replicas" not in ingest["spec"]
    hpa = result.find("HorizontalPodAutoscaler", "fleet-ingest")
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["maxReplicas"] == 20
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": "fleet-ingest"}
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    scale_down = hpa["spec"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] == 600
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert "ScaledObject" not in {c["kind"] for c in result.children}
    assert builders.ObjectRef("keda.sh/v1alpha1", "ScaledObject", "fleet-ingest") in result.absent
    # other tiers keep explicit replicas
    assert result.find("StatefulSet", "fleet-middle")["spec"]["replicas"] == 3
    monitor = result.find("ServiceMonitor", "fleet")
    assert monitor["spec"]["selector"]["matchLabels"] == {"iotpipe.dev/pipeline": "fleet",
                                                          "iotpipe.dev/scrape": "true"}


def test_keda_mode_builds_scaledobject_not_hpa() -> None:
    result = builders.build(_sample("autoscaled-keda.yaml"), ALL_CAPS)
    kinds = {c["kind"] for c in result.children}
    assert "ScaledObject" in kinds and "HorizontalPodAutoscaler" not in kinds
    assert builders.ObjectRef("autoscaling/v2", "HorizontalPodAutoscaler",
                              "keda-fleet-ingest") in result.absent
    scaled = result.find("ScaledObject", "keda-fleet-ingest")
    assert scaled["spec"]["minReplicaCount"] == 2 and scaled["spec"]["maxReplicaCount"] == 50
    prometheus, cpu = scaled["spec"]["triggers"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["metadata"]["threshold"] == "5000"
    assert "iotpipe_ingest_connections" in prometheus["metadata"]["query"]
    assert 'namespace="default"' in prometheus["metadata"]["query"]
    assert cpu == {"type": "cpu", "metricType": "Utilization", "metadata": {"value": "70"}}
    assert "replicas" not in result.find("StatefulSet", "keda-fleet-ingest")["spec"]
    # autoscaled without explicit resources: CPU requests are added so targets mean something
    requests = _container(result.find("StatefulSet", "keda-fleet-ingest"))["resources"]
    assert requests["requests"]["cpu"] == "500m"


def test_keda_missing_is_a_problem_not_a_crash() -> None:
    result = builders.build(_sample("autoscaled-keda.yaml"), ClusterCapabilities())
    assert [p.reason for p in result.problems] == ["KedaNotInstalled"]
    kinds = {c["kind"] for c in result.children}
    assert "ScaledObject" not in kinds and "HorizontalPodAutoscaler" not in kinds
    assert "ServiceMonitor" not in kinds  # its CRD is absent too
    # without an autoscaler the operator holds ingest at the minimum
    assert result.find("StatefulSet", "keda-fleet-ingest")["spec"]["replicas"] == 2


def test_pmem_class_and_access_mode() -> None:
    result = builders.build(_sample("pmem.yaml"))
    claim = result.find("StatefulSet", "pmem-ingest")["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["storageClassName"] == builders.PMEM_STORAGE_CLASS
    assert claim["accessModes"] == ["ReadWriteOncePod"]
    assert claim["resources"]["requests"]["storage"] == f"{8 * 1024 + 820}Mi"  # 8Gi + 10% up
    middle = result.find("StatefulSet", "pmem-middle")["spec"]["volumeClaimTemplates"][0]
    assert middle["spec"]["storageClassName"] == "pmem-csi-sc-ext4"
    storage = result.find("StatefulSet", "pmem-storage")["spec"]["volumeClaimTemplates"][0]
    assert storage["spec"]["storageClassName"] == "standard"


def test_several_sinks_and_registry() -> None:
    result = builders.build(_sample("sinks.yaml"))
    data = result.find("ConfigMap", "lake-storage-config")["data"]
    sinks = data["IOTPIPE_STORAGE_SINKS"].split(",")
    assert len(sinks) == 4 and sinks[1] == "parquet:///var/lib/iotpipe/store/lake"
    assert data["IOTPIPE_STORAGE_REGISTRY_FILE"] == "/etc/iotpipe/registry/registry.yaml"
    storage = result.find("StatefulSet", "lake-storage")
    volumes = storage["spec"]["template"]["spec"]["volumes"]
    assert {"name": "registry", "configMap": {"name": "lake-registry", "items": [
        {"key": "registry.yaml", "path": "registry.yaml"}]}} in volumes
    relay = result.find("Deployment", "lake-relay")
    assert relay["spec"]["replicas"] == 2
    assert result.find("Service", "lake-relay")["spec"]["type"] == "LoadBalancer"
    relay_config = result.find("ConfigMap", "lake-relay-config")["data"]
    assert relay_config["IOTPIPE_RELAY_CLIENT_QUEUE"] == "5000"
    ingest_config = result.find("ConfigMap", "lake-ingest-config")["data"]
    assert ingest_config["IOTPIPE_INGEST_RATE_LIMIT"] == "50"
    assert ingest_config["IOTPIPE_INGEST_MAX_FRAME_BYTES"] == "65536"


def test_config_hash_changes_with_config_only() -> None:
    pipeline = _sample("minimal.yaml")
    hashes = {}
    for tier, kind in [("ingest", "StatefulSet"), ("relay", "Deployment")]:
        workload = builders.build(pipeline).find(kind, f"demo-{tier}")
        hashes[tier] = workload["spec"]["template"]["metadata"]["annotations"][
            builders.CONFIG_HASH_ANNOTATION]
    again = builders.build(pipeline).find("StatefulSet", "demo-ingest")
    assert again["spec"]["template"]["metadata"]["annotations"][
        builders.CONFIG_HASH_ANNOTATION] == hashes["ingest"]  # deterministic
    pipeline["spec"]["ingest"]["rateLimit"] = 10
    changed = builders.build(pipeline)
    annotation = builders.CONFIG_HASH_ANNOTATION
    assert changed.find("StatefulSet", "demo-ingest")["spec"]["template"]["metadata"][
        "annotations"][annotation] != hashes["ingest"]
    assert changed.find("Deployment", "demo-relay")["spec"]["template"]["metadata"][
        "annotations"][annotation] == hashes["relay"]  # relay config untouched


def test_extra_env_is_passed_and_hashed() -> None:
    pipeline = _sample("minimal.yaml")
    before = builders.build(pipeline).find("StatefulSet", "demo-middle")
    pipeline["spec"]["middle"] = {"env": [{"name": "IOTPIPE_MIDDLE_LOG_LEVEL", "value": "debug"}]}
    after = builders.build(pipeline).find("StatefulSet", "demo-middle")
    assert _container(after)["env"] == [{"name": "IOTPIPE_MIDDLE_LOG_LEVEL", "value": "debug"}]
    key = builders.CONFIG_HASH_ANNOTATION
    assert (before["spec"]["template"]["metadata"]["annotations"][key]
            != after["spec"]["template"]["metadata"]["annotations"][key])


def test_drain_job_mounts_the_retained_queue() -> None:
    job = builders.build_drain_job(_sample("minimal.yaml"), 4)
    assert job["metadata"]["name"] == "demo-ingest-drain-4"
    pod = job["spec"]["template"]["spec"]
    assert {"name": "queue", "persistentVolumeClaim": {"claimName": "queue-demo-ingest-4"}} \
        in pod["volumes"]
    args = pod["containers"][0]["args"]
    assert args[:5] == ["drain", "--data-dir", "/var/lib/iotpipe/queue",
                        "--node-id", "demo-ingest-4"]
    assert "--middle-endpoints" not in args
    assert args[args.index("--middle-endpoints-file") + 1] == "/etc/iotpipe/endpoints/router"
    assert {"name": "endpoints", "configMap": {"name": "demo-endpoints"}} in pod["volumes"]
    assert pod["restartPolicy"] == "Never"
    assert args[args.index("--queue-bytes") + 1] == str(2**30)


def test_build_rejects_nameless_pipeline() -> None:
    with pytest.raises(ValueError, match=r"metadata\.name"):
        builders.build({"metadata": {}, "spec": {}})


def test_render_cli_prints_every_child(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "iotpipe_operator.cli", "render", "-f",
         str(REPO / "samples" / "autoscaled-keda.yaml"), "--keda", "--drain-ordinals", "5"],
        capture_output=True, text=True, timeout=60, check=True)
    docs = list(yaml.safe_load_all(out.stdout))
    kinds = [d["kind"] for d in docs]
    assert "ScaledObject" in kinds and kinds[-1] == "Job"
    assert len(docs) == len(builders.build(_sample("autoscaled-keda.yaml"),
                                           ClusterCapabilities(keda=True)).children) + 1


def test_render_cli_names_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    out = subprocess.run([sys.executable, "-m", "iotpipe_operator.cli", "render", "-f", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "expected exactly one IoTPipeline document" in out.stderr


def test_render_cli_names_the_bad_field(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("apiVersion: iotpipe.dev/v1alpha1\nkind: IoTPipeline\nmetadata: {name: x}\n"
                   "spec: {ingest: {replicas: three, auth: {secretName: s}}}\n")
    out = subprocess.run([sys.executable, "-m", "iotpipe_operator.cli", "render", "-f", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "spec.ingest.replicas: 'three' is not of type 'integer'" in out.stderr


# --- security (#14) and the live page (#13) -----------------------------------------------

def _config(result: BuildResult, tier: str) -> dict[str, str]:
    data: dict[str, str] = result.find("ConfigMap", f"demo-{tier}-config")["data"]
    return data


def _pod(result: BuildResult, tier: str) -> dict[str, Any]:
    kind = "Deployment" if tier == "relay" else "StatefulSet"
    pod: dict[str, Any] = result.find(kind, f"demo-{tier}")["spec"]["template"]["spec"]
    return pod


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in pod["volumes"] if v["name"] == name), None)


def _mount(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in pod["containers"][0]["volumeMounts"] if m["name"] == name), None)


def test_curve_secret_is_mounted_in_every_tier_and_the_drain_job() -> None:
    pipeline = _sample("minimal.yaml")
    result = builders.build(pipeline)
    assert result.curve_secret == "demo-curve"
    for tier in builders.TIERS:
        env = f"IOTPIPE_{tier.upper()}_CURVE_KEYS_DIR"
        assert _config(result, tier)[env] == "/etc/iotpipe/curve", tier
        pod = _pod(result, tier)
        volume = _volume(pod, "curve")
        assert volume is not None and volume["secret"]["secretName"] == "demo-curve", tier
        # a whole-directory mount (no subPath): rotation steps reach running pods
        assert _mount(pod, "curve") == {"name": "curve", "mountPath": "/etc/iotpipe/curve",
                                        "readOnly": True}
        items = {i["key"] for i in volume["secret"].get("items", [])}
        if tier == "middle":
            assert not items  # every role's public keys, current and next
        else:  # its own key pair and the middle's public key, no other role's secret
            assert items == {f"{tier}.key_secret", "middle.key"}, tier
    job = builders.build_drain_job(pipeline, 2)
    pod = job["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--curve-keys-dir") + 1] == "/etc/iotpipe/curve"
    assert {i["key"] for i in _volume(pod, "curve")["secret"]["items"]} == \
        {"ingest.key_secret", "middle.key"}  # drain speaks as the ingest role
    assert _mount(pod, "curve") is not None


def test_curve_disabled_mounts_no_keys_and_wants_no_secret() -> None:
    pipeline = _sample("minimal.yaml")
    pipeline["spec"]["security"] = {"curve": {"enabled": False}}
    result = builders.build(pipeline)
    assert result.curve_secret is None
    for tier in builders.TIERS:
        assert not any(k.endswith("_CURVE_KEYS_DIR") for k in _config(result, tier))
        assert _volume(_pod(result, tier), "curve") is None
    assert "--curve-keys-dir" not in \
        builders.build_drain_job(pipeline, 0)["spec"]["template"]["spec"]["containers"][0]["args"]


def test_curve_secret_carries_the_key_files() -> None:
    secret = builders.curve_secret("demo", "iot", {"ingest.key": b"pub", "ingest.key_secret":
                                                   b"sec\n"})
    assert secret["metadata"] == {"name": "demo-curve", "namespace": "iot",
                                  "labels": builders.labels_for("demo", "curve")}
    assert secret["data"] == {"ingest.key": "cHVi", "ingest.key_secret": "c2VjCg=="}


@pytest.mark.parametrize("tier", ["ingest", "relay"])
def test_tls_secret_is_mounted_and_probes_stay_on_metrics(tier: str) -> None:
    pipeline = _sample("minimal.yaml")
    plain = builders.build(pipeline)
    assert not any("_TLS_" in k for k in _config(plain, tier))
    pipeline["spec"].setdefault(tier, {})["tls"] = {"secretName": f"{tier}-cert"}
    result = builders.build(pipeline)
    config = _config(result, tier)
    prefix = f"IOTPIPE_{tier.upper()}_"
    assert config[prefix + "TLS_CERT"] == "/etc/iotpipe/tls/tls.crt"
    assert config[prefix + "TLS_KEY"] == "/etc/iotpipe/tls/tls.key"
    pod = _pod(result, tier)
    volume = _volume(pod, "tls")
    assert volume is not None and volume["secret"]["secretName"] == f"{tier}-cert"
    assert "subPath" not in _mount(pod, "tls")  # a renewed certificate replaces the files
    container = pod["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
    # only that tier: the other one stays plain
    other = "relay" if tier == "ingest" else "ingest"
    assert _volume(_pod(result, other), "tls") is None
    # a new certificate Secret name rolls the pods
    annotation = builders.CONFIG_HASH_ANNOTATION
    kind = "Deployment" if tier == "relay" else "StatefulSet"
    assert (plain.find(kind, f"demo-{tier}")["spec"]["template"]["metadata"]["annotations"]
            [annotation] != result.find(kind, f"demo-{tier}")["spec"]["template"]["metadata"]
            ["annotations"][annotation])


def test_deny_list_is_mounted_in_ingest_and_relay_and_created_empty() -> None:
    result = builders.build(_sample("minimal.yaml"))
    for tier in ("ingest", "relay"):
        assert _config(result, tier)[f"IOTPIPE_{tier.upper()}_DENY_LIST_FILE"] == \
            "/etc/iotpipe/deny/deny.yaml"
        volume = _volume(_pod(result, tier), "deny-list")
        assert volume is not None and volume["configMap"]["name"] == "demo-deny-list"
        assert "subPath" not in _mount(_pod(result, tier), "deny-list")
    for tier in ("middle", "storage"):
        assert _volume(_pod(result, tier), "deny-list") is None
    # created, never applied: not among the applied children
    assert ("ConfigMap", "demo-deny-list") not in _names(result)
    (deny,) = result.create_only
    assert deny["metadata"]["name"] == "demo-deny-list"
    assert yaml.safe_load(deny["data"]["deny.yaml"]) == {"devices": [], "clients": [],
                                                         "token_ids": []}


def test_live_page_reads_every_storage_pod_and_each_tier_health() -> None:
    from iotpipe.relay.web import parse_health_targets

    pipeline = _sample("minimal.yaml")
    pipeline["metadata"]["namespace"] = "iot"
    pipeline["spec"]["storage"] = {"replicas": 3}
    result = builders.build(pipeline)
    assert _config(result, "storage")["IOTPIPE_STORAGE_READ_API"] == "true"
    relay = _config(result, "relay")
    assert relay["IOTPIPE_RELAY_HISTORY_URLS"].split(",") == [
        f"http://demo-storage-{i}.demo-storage.iot.svc:9100" for i in range(3)]
    targets = parse_health_targets(relay["IOTPIPE_RELAY_HEALTH_URLS"].split(","))
    assert targets == {"ingest": "http://demo-ingest-headless.iot.svc:9100/metrics",
                       "middle": "http://demo-middle.iot.svc:9100/metrics",
                       "storage": "http://demo-storage.iot.svc:9100/metrics"}
    # each named Service exists and serves the metrics port
    for url in targets.values():
        service = result.find("Service", url.split("//")[1].split(".")[0])
        assert {"name": "metrics", "port": 9100, "targetPort": "metrics",
                "protocol": "TCP"} in service["spec"]["ports"]
    pipeline["spec"]["storage"] = {"replicas": 0}
    assert "IOTPIPE_RELAY_HISTORY_URLS" not in _config(builders.build(pipeline), "relay")


def test_network_policy_admits_the_relay_to_metrics_ports() -> None:
    pipeline = _sample("minimal.yaml")
    open_policy = builders.build(pipeline).find("NetworkPolicy", "demo")
    metrics_rule = next(r for r in open_policy["spec"]["ingress"]
                        if r["ports"] == [{"protocol": "TCP", "port": 9100}])
    assert "from" not in metrics_rule  # unset: from anywhere, the relay included
    prometheus = {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    pipeline["spec"]["networkPolicy"] = {"metricsFrom": [prometheus]}
    policy = builders.build(pipeline).find("NetworkPolicy", "demo")
    metrics_rule = next(r for r in policy["spec"]["ingress"]
                        if r["ports"] == [{"protocol": "TCP", "port": 9100}])
    assert metrics_rule["from"] == [
        prometheus, {"podSelector": {"matchLabels": {"iotpipe.dev/pipeline": "demo",
                                                     "iotpipe.dev/tier": "relay"}}}]
