"""The iotpipe-operator Helm chart, proven offline with the real Helm engine.

Helm's own Go engine (helm-python-sdk) lints and renders the chart for several value sets;
every rendered object is validated strictly (unknown fields are errors) against the
Kubernetes OpenAPI schemas of kubernetes-validate, and the behaviour the issue asks for
(one Recreate replica, non-root read-only container, liveness endpoint, least-privilege
RBAC, watch namespaces, dashboards) is asserted on the parsed objects.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "iotpipe-operator"
RELEASE = "iotpipe"
NAMESPACE = "iotpipe-system"
# The chart's floor (Chart.yaml kubeVersion) and the newest schema kubernetes-validate has.
KUBE_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]

# Value sets: the defaults plus the non-default shapes an operator of a cluster would use.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "namespaced-dashboards": {
        "watchNamespaces": ["iot-prod", "iot-staging"],
        "operator": {"logLevel": "debug", "reconcileInterval": 15,
                     "extraEnv": [{"name": "TZ", "value": "UTC"}]},
        "grafanaDashboards": {"enabled": True, "namespace": "monitoring",
                              "annotations": {"grafana_folder": "IoT"}},
        "image": {"repository": "registry.example.com/iotpipe-operator",
                  "digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"example.com/team": "iot"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "iot",
                         "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
    },
    "existing-service-account": {
        "serviceAccount": {"create": False, "name": "iotpipe-operator-sa"},
        "fullnameOverride": "iotop",
        "image": {"tag": "0.2.0-rc1", "pullPolicy": "Always"},
    },
    "no-rbac": {"rbac": {"create": False}},
    # The tightest RBAC: one namespace, kopf's run-time scanning off (nothing cluster-scoped).
    "namespaced-no-scanning": {"watchNamespaces": ["iot"], "operator": {"scanning": False}},
    "cluster-wide-no-scanning": {"operator": {"scanning": False}},
}


def render(values: dict[str, Any]) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        return chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in rendered.items():
        if not path.endswith((".yaml", ".yml")):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in by_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def operator_args(docs: list[dict[str, Any]]) -> list[str]:
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    return [str(arg) for arg in container["args"]]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    yield request.param, objects(render(VALUE_SETS[request.param]))


# ---------------------------------------------------------------- chart files


def test_chart_crd_is_identical_to_the_single_source() -> None:
    source = REPO / "crds" / "iotpipelines.yaml"
    copy = CHART / "crds" / "iotpipelines.yaml"
    assert copy.read_bytes() == source.read_bytes(), (
        "charts/iotpipe-operator/crds/iotpipelines.yaml differs from crds/iotpipelines.yaml; "
        "copy it: cp crds/iotpipelines.yaml charts/iotpipe-operator/crds/")


def test_chart_crd_is_a_valid_customresourcedefinition() -> None:
    with helm.Chart.load(CHART) as chart:
        crds = chart.crds
    assert [c["filename"] for c in crds] == ["iotpipe-operator/crds/iotpipelines.yaml"]
    crd = yaml.safe_load(crds[0]["data"])
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(crd, version, strict=True)
    assert crd["spec"]["group"] == "iotpipe.dev"
    assert crd["spec"]["names"]["kind"] == "IoTPipeline"


def test_helm_lint_reports_no_warnings_or_errors() -> None:
    for values in VALUE_SETS.values():
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, report


def test_helm_lint_against_the_oldest_supported_kubernetes() -> None:
    report = helm.lint(CHART, strict=True, kube_version="v1.29.0")
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2]


def test_packaged_chart_carries_crd_dashboards_and_rules(tmp_path: Path) -> None:
    archive = helm.package(CHART, destination=tmp_path)
    with helm.Chart.load(archive) as packaged:
        assert [c["filename"] for c in packaged.crds] == [
            "iotpipe-operator/crds/iotpipelines.yaml"]
        names = {f["name"] for f in packaged.files}
        assert {"dashboards/iotpipe-pipeline.json", "files/operator-rules.yaml"} <= names
        rendered = objects(packaged.render(values={"grafanaDashboards": {"enabled": True}},
                                           name=RELEASE, namespace=NAMESPACE))
    assert by_kind(rendered, "ConfigMap") and by_kind(rendered, "ClusterRole")


def test_every_value_is_documented_in_values_yaml_and_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    text = (CHART / "values.yaml").read_text()
    defaults = yaml.safe_load(text)

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        for key, value in values.items():
            assert key in node.get("properties", {}), f"{path}{key} is missing from the schema"
            prop = node["properties"][key]
            assert prop.get("description"), f"{path}{key} has no description in the schema"
            if isinstance(value, dict) and "properties" in prop and prop["properties"]:
                walk(value, prop, f"{path}{key}.")

    walk(defaults, schema, "")
    # Every top-level key carries a "# --" comment right above it, or (for a block of
    # settings) its first nested line is one.
    lines = text.splitlines()
    for key in defaults:
        index = lines.index(next(line for line in lines if line.startswith(f"{key}:")))
        comment_above = []
        for line in reversed(lines[:index]):
            if not line.startswith("#"):
                break
            comment_above.append(line)
        nested_first = lines[index + 1].strip() if index + 1 < len(lines) else ""
        assert any(line.startswith("# --") for line in comment_above) or \
            nested_first.startswith("# --"), f"values.yaml: {key} has no '# --' comment"


@pytest.mark.parametrize(("values", "message"), [
    ({"watchNamespace": ["typo"]}, "watchNamespace"),
    ({"operator": {"logLevel": "loud"}}, "logLevel"),
    ({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
    ({"image": {"digest": "latest"}}, "digest"),
    ({"operator": {"livenessPort": 0}}, "livenessPort"),
])
def test_bad_values_are_rejected_naming_the_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert message in str(caught.value)


def test_missing_service_account_name_is_a_clear_error() -> None:
    with pytest.raises(helm.HelmError, match=r"serviceAccount\.name is required"):
        render({"serviceAccount": {"create": False}})


# ---------------------------------------------------------------- rendered objects


def test_every_object_passes_strict_kubernetes_validation(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    assert docs, f"{name}: nothing rendered"
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for "
                            f"{version}: {'.'.join(map(str, exc.path))}: {exc.message}")


def test_namespaced_objects_land_in_the_release_namespace(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    values = VALUE_SETS[name]
    watched = set(values.get("watchNamespaces", []))
    dashboards_ns = values.get("grafanaDashboards", {}).get("namespace") or NAMESPACE
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            assert "namespace" not in meta
        elif kind == "RoleBinding":
            assert meta["namespace"] in watched
        elif kind == "ConfigMap":
            assert meta["namespace"] == dashboards_ns
        else:
            assert meta["namespace"] == NAMESPACE, f"{kind}/{meta['name']}"


def test_operator_deployment_is_one_recreate_replica_non_root_read_only(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    deployment = one(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # A read-only root needs a writable scratch directory for Python's tempfile.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])


def test_liveness_probe_targets_the_endpoint_the_operator_serves(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    args = operator_args(docs)
    (endpoint,) = [a.split("=", 1)[1] for a in args if a.startswith("--liveness-endpoint=")]
    match = re.fullmatch(r"http://0\.0\.0\.0:(\d+)(/\S*)", endpoint)
    assert match, endpoint
    probe = container["livenessProbe"]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports[probe["port"]] == int(match.group(1))
    assert probe["path"] == match.group(2)


def test_operator_arguments_parse_with_the_operators_own_settings(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """The chart's flags are exactly the ones `iotpipe-operator run` accepts."""
    from iotpipe.settings import parse_settings
    from iotpipe_operator import cli

    name, docs = rendered
    args = operator_args(docs)
    assert args[0] == "run"
    settings = parse_settings(cli.RunSettings, args[1:])
    values = VALUE_SETS[name]
    assert settings.standalone is True
    assert list(settings.namespaces) == values.get("watchNamespaces", [])
    assert settings.log_level == values.get("operator", {}).get("logLevel", "info")
    assert settings.reconcile_interval == values.get("operator", {}).get(
        "reconcileInterval", 60)
    assert settings.scanning == values.get("operator", {}).get("scanning", True)


def test_image_reference_follows_tag_digest_and_app_version(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    with helm.Chart.load(CHART) as chart:
        app_version = chart.metadata["appVersion"]
    expected = {
        "defaults": f"ghcr.io/iotpipe/iotpipe-operator:{app_version}",
        "namespaced-dashboards": "registry.example.com/iotpipe-operator@sha256:" + "ab" * 32,
        "existing-service-account": "ghcr.io/iotpipe/iotpipe-operator:0.2.0-rc1",
        "no-rbac": f"ghcr.io/iotpipe/iotpipe-operator:{app_version}",
        "namespaced-no-scanning": f"ghcr.io/iotpipe/iotpipe-operator:{app_version}",
        "cluster-wide-no-scanning": f"ghcr.io/iotpipe/iotpipe-operator:{app_version}",
    }[name]
    assert container["image"] == expected


# ---------------------------------------------------------------- RBAC


def _service_account(docs: list[dict[str, Any]]) -> str:
    name: str = one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    return name


def _rules_for_subject(docs: list[dict[str, Any]], namespace: str | None
                       ) -> list[dict[str, Any]]:
    """Rules the operator's ServiceAccount holds in ``namespace`` (None: cluster-wide)."""
    account = _service_account(docs)
    roles = {d["metadata"]["name"]: d for d in by_kind(docs, "ClusterRole")}
    bindings = by_kind(docs, "ClusterRoleBinding")
    if namespace is not None:
        bindings += [b for b in by_kind(docs, "RoleBinding")
                     if b["metadata"]["namespace"] == namespace]
    rules: list[dict[str, Any]] = []
    for binding in bindings:
        if {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE} in \
                binding["subjects"]:
            rules += roles[binding["roleRef"]["name"]]["rules"]
    return rules


def _allowed(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               for r in rules)


def test_rbac_is_bound_cluster_wide_or_per_watched_namespace(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = rendered
    values = VALUE_SETS[name]
    if values.get("rbac", {}).get("create") is False:
        kinds = {d["kind"] for d in docs}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
        return
    watched = values.get("watchNamespaces", [])
    scanning = values.get("operator", {}).get("scanning", True)
    cluster_rules = _rules_for_subject(docs, None)
    assert _allowed(cluster_rules, "apiextensions.k8s.io", "customresourcedefinitions",
                    "watch") == scanning
    if not scanning and watched:
        assert not cluster_rules and not by_kind(docs, "ClusterRoleBinding")
    if not watched:
        assert not by_kind(docs, "RoleBinding")
        assert _allowed(cluster_rules, "iotpipe.dev", "iotpipelines", "watch")
        assert _allowed(cluster_rules, "", "namespaces", "list") == scanning
    else:
        # Nothing of the pipelines' API cluster-wide: only in the watched namespaces.
        assert not _allowed(cluster_rules, "iotpipe.dev", "iotpipelines", "list")
        assert not _allowed(cluster_rules, "", "namespaces", "list")
        assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == \
            sorted(watched)
        for namespace in watched:
            rules = _rules_for_subject(docs, namespace)
            assert _allowed(rules, "iotpipe.dev", "iotpipelines", "watch")
            assert _allowed(rules, "iotpipe.dev", "iotpipelines/status", "patch")
            assert _allowed(rules, "apps", "statefulsets", "create")
        assert not _allowed(_rules_for_subject(docs, "kube-system"), "apps", "statefulsets",
                            "create")


def test_rbac_grants_nothing_broad(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: {rule}"
            # Secrets: only the CurveZMQ Secret, by name (create; get and patch to rotate
            # it), never listed or watched; nothing may escalate/bind/impersonate.
            assert "secrets" not in rule["resources"] or \
                set(rule["verbs"]) <= {"create", "get", "patch"}
            assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate"}


def _normalised(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_chart_operator_rules_file_is_generated_from_rbac_py() -> None:
    from iotpipe_operator import rbac

    text = (CHART / "files" / "operator-rules.yaml").read_text()
    body = "".join(line for line in text.splitlines(keepends=True)
                   if not line.startswith("#"))
    # One JSON flow mapping per rule: valid YAML, readable, and free of the anchors and
    # aliases a YAML dump of the shared verb lists would produce.
    expected = "".join(f"- {json.dumps(rule)}\n" for rule in rbac.OPERATOR_RULES)
    assert body == expected, (
        "charts/iotpipe-operator/files/operator-rules.yaml is stale; regenerate it with the "
        "command in its header")
    assert yaml.safe_load(body) == rbac.OPERATOR_RULES


@pytest.mark.parametrize("value_set", ["defaults", "namespaced-dashboards",
                                       "namespaced-no-scanning", "cluster-wide-no-scanning"])
def test_rbac_grants_exactly_what_the_operator_declares(value_set: str) -> None:
    """Cluster-wide: OPERATOR_RULES + FRAMEWORK_RULES. Namespaced: OPERATOR_RULES only in
    each watched namespace, and of the framework rules only CRD watching (kopf watches
    no namespaces when it is given a fixed list). Without scanning: no framework rules."""
    from iotpipe_operator import rbac

    docs = objects(render(VALUE_SETS[value_set]))
    watched = VALUE_SETS[value_set].get("watchNamespaces", [])
    scanning = VALUE_SETS[value_set].get("operator", {}).get("scanning", True)
    framework = _normalised(rbac.FRAMEWORK_RULES) if scanning else set()
    operator = _normalised(rbac.OPERATOR_RULES)
    if not watched:
        granted = _normalised(_rules_for_subject(docs, None))
        assert granted == operator | framework, (
            f"chart grants but operator does not declare: "
            f"{sorted(granted - operator - framework)}; declared but not granted: "
            f"{sorted((operator | framework) - granted)}")
        return
    framework_namespaced = {rule for rule in framework if rule[1] != "namespaces"}
    assert _normalised(_rules_for_subject(docs, None)) == framework_namespaced
    for namespace in watched:
        assert _normalised(_rules_for_subject(docs, namespace)) == \
            operator | framework_namespaced


# ---------------------------------------------------------------- dashboards


def _exported_metric_names() -> set[str]:
    """Metric names the workload tiers register (Counters also as ``*_total``)."""
    names: set[str] = set()
    for path in (REPO / "workloads" / "iotpipe").rglob("*.py"):
        for name in re.findall(r"[\"'](iotpipe_[a-z0-9_]+)[\"']", path.read_text()):
            names |= {name, name.removesuffix("_total") + "_total"}
    return names


def test_dashboard_configmap_only_when_enabled() -> None:
    assert not by_kind(objects(render({})), "ConfigMap")
    docs = objects(render(VALUE_SETS["namespaced-dashboards"]))
    configmap = one(docs, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "IoT"}
    dashboard = json.loads(configmap["data"]["iotpipe-pipeline.json"])
    assert dashboard["uid"] == "iotpipe-pipeline"


def test_dashboard_plots_the_pipeline_with_metrics_the_tiers_export() -> None:
    dashboard = json.loads((CHART / "dashboards" / "iotpipe-pipeline.json").read_text())
    exprs = {panel["title"]: [t["expr"] for t in panel["targets"]]
             for panel in dashboard["panels"]}
    used = {name for panel_exprs in exprs.values() for expr in panel_exprs
            for name in re.findall(r"\b(iotpipe_[a-z0-9_]+)\b", expr)}
    unknown = used - _exported_metric_names()
    assert not unknown, f"dashboard uses metrics no tier exports: {sorted(unknown)}"

    def panel_using(metric: str, title_word: str, selector: str = "") -> None:
        assert any(title_word.lower() in title.lower()
                   and any(metric in e and selector in e for e in panel_exprs)
                   for title, panel_exprs in exprs.items()), (metric, title_word)

    panel_using("iotpipe_queue_depth_records", "queue depth per tier", "tier")
    panel_using("iotpipe_ingest_connections", "connections")
    panel_using("iotpipe_ingest_messages_accepted_total", "acks/s", "rate(")
    panel_using("iotpipe_queue_depth_records", "middle log depth", 'tier="middle"')
    panel_using("iotpipe_relay_clients", "relay clients")
    panel_using("iotpipe_storage_records_written_total", "storage write rate", "rate(")
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


def test_chart_kube_version_covers_the_crd_cel_features() -> None:
    """An API server accepts quantity() in CRD validation rules only from 1.29: the chart's
    floor must not promise an older cluster."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    floor = re.match(r">=\s*(\d+)\.(\d+)", chart["kubeVersion"])
    assert floor is not None, chart["kubeVersion"]
    rules = json.dumps(yaml.safe_load((CHART / "crds" / "iotpipelines.yaml").read_text()))
    if "quantity(" in rules:
        assert (int(floor.group(1)), int(floor.group(2))) >= (1, 29)
    assert KUBE_VERSIONS[0] == f"{floor.group(1)}.{floor.group(2)}.0"
