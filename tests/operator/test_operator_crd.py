"""The CRD: single source, structural schema with defaults, CEL rules, samples."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.crd import CRD_PATH, REPO, load_crd, root_schema, validate

from iotpipe_operator import cli, crd

pytestmark = pytest.mark.unit

SAMPLES = sorted((REPO / "samples").glob("*.yaml"))
INVALID = sorted((REPO / "samples" / "invalid").glob("*.yaml"))


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_crd_file_is_the_generated_one() -> None:
    assert CRD_PATH.read_text() == cli.crd_yaml(), \
        "crds/iotpipelines.yaml is stale: run `iotpipe-operator crd > crds/iotpipelines.yaml`"


def test_crd_identity_and_subresources() -> None:
    definition = load_crd()
    spec = definition["spec"]
    assert definition["metadata"]["name"] == "iotpipelines.iotpipe.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["iotp"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.ingest.replicas"
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Ready", "Phase", "Ingest", "Age"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True


def _walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{path}.{name}")
    if "items" in schema:
        out += _walk(schema["items"], f"{path}[]")
    return out


def test_schema_is_structural() -> None:
    """Every node has a type (or preserves unknown fields); no additionalProperties with
    properties; every default is valid against its own node."""
    import jsonschema

    for path, node in _walk(root_schema()):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "default" in node:
            defaulted = crd.apply_defaults(node, node["default"])
            jsonschema.validate(defaulted, node)


def test_empty_spec_defaults_fill_every_tier() -> None:
    spec = crd.defaulted_spec({})
    assert spec["ingest"]["replicas"] == 2
    assert spec["ingest"]["queue"]["size"] == "1Gi"
    assert spec["ingest"]["autoscaling"]["mode"] == "none"
    assert spec["middle"]["queue"]["size"] == "4Gi"
    assert spec["storage"]["sinks"] == ["sqlite:///var/lib/iotpipe/store/readings.db"]
    assert spec["paused"] is False
    # user values win over defaults
    assert crd.defaulted_spec({"ingest": {"replicas": 7}})["ingest"]["replicas"] == 7


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_valid_samples_pass_schema_and_cel(path: Path) -> None:
    assert validate(_load(path)) == []


def _expected_message(path: Path) -> tuple[str | None, str]:
    first = path.read_text().splitlines()[0]
    match = re.match(r"# INVALID(?: UPDATE of (\S+))?: (.+)$", first)
    assert match, f"{path.name} must start with '# INVALID[ UPDATE of OLD]: message'"
    return match.group(1), match.group(2)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_samples_rejected_with_their_message(path: Path) -> None:
    old_path, message = _expected_message(path)
    old = _load(REPO / old_path) if old_path else None
    if old is not None:
        assert validate(old) == [], "the old object of an update case must be valid"
    errors = validate(_load(path), old)
    assert any(message in error for error in errors), errors


def test_transition_rules_allow_growth_and_same_class() -> None:
    old = _load(REPO / "samples" / "pmem.yaml")
    grown = _load(REPO / "samples" / "pmem.yaml")
    grown["spec"]["ingest"]["queue"]["size"] = "8192Mi"  # equal in bytes
    grown["spec"]["middle"]["queue"]["size"] = "40G"  # 40e9 > 32Gi
    assert validate(grown, old) == []
    grown["spec"]["middle"]["queue"]["size"] = "30G"  # 30e9 < 32Gi = 34.36e9
    assert any("size may only grow" in e for e in validate(grown, old))


def test_adding_a_storage_class_later_is_rejected() -> None:
    old = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "x"},
           "spec": {"ingest": {"auth": {"secretName": "s"}}}}
    new = yaml.safe_load(yaml.safe_dump(old))
    new["spec"]["middle"] = {"queue": {"storageClassName": "fast"}}
    assert any("storageClassName is immutable" in e for e in validate(new, old))


def test_schema_errors_name_the_field() -> None:
    bad = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "x"},
           "spec": {"ingest": {"auth": {"secretName": "s"}, "queue": {"size": "lots"}}}}
    errors = validate(bad)
    assert errors and errors[0].startswith("spec.ingest.queue.size")


def test_long_names_rejected() -> None:
    obj = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "n" * 41},
           "spec": {"ingest": {"auth": {"insecureNoAuth": True}}}}
    assert any("at most 40 characters" in e for e in validate(obj))
