"""The deployment contract: every setting the builders hand a tier (env keys, drain flags,
ports) is one that tier's settings model has."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from iotpipe_operator import builders, contract
from iotpipe_operator.builders import ClusterCapabilities

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.yaml"))
GLOBAL_KEYS = {"IOTPIPE_AUTH_SECRET_FILE"}  # read by iotpipe.auth in every tier
CONTRACT_1 = {("ingest", "middle_endpoints_file"), ("relay", "middle_pub_endpoints_file"),
              ("storage", "feed_endpoints_file"), ("drain", "middle_endpoints_file")}


def _known(tier: str, key: str) -> bool:
    prefix = str(contract.settings_model(tier).model_config["env_prefix"])
    if not key.startswith(prefix):
        return False
    field = key[len(prefix):].lower()
    return contract.has_setting(tier, field)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_env_key_is_a_setting_of_its_tier(path: Path) -> None:
    pipeline = yaml.safe_load(path.read_text())
    result = builders.build(pipeline, ClusterCapabilities(keda=True, service_monitor=True))
    name = pipeline["metadata"]["name"]
    for tier in builders.TIERS:
        data = result.find("ConfigMap", f"{name}-{tier}-config")["data"]
        unknown = [k for k in data if k not in GLOBAL_KEYS and not _known(tier, k)]
        assert unknown == [], f"{tier}: {unknown}"


def test_drain_job_flags_are_drain_settings() -> None:
    job = builders.build_drain_job(yaml.safe_load((REPO / "samples" / "minimal.yaml")
                                                  .read_text()), 3)
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = [a[2:].replace("-", "_") for a in args if a.startswith("--")]
    assert flags and all(contract.has_setting("drain", f)
                         for f in flags), flags


def test_service_ports_are_the_tiers_default_ports() -> None:
    result = builders.build(yaml.safe_load((REPO / "samples" / "minimal.yaml").read_text()))
    middle = {p["name"]: p["port"] for p in result.find("Service", "demo-middle")["spec"]["ports"]}
    assert middle == {"router": contract.default("middle", "router_port"),
                      "pub": contract.default("middle", "pub_port"),
                      "feed": contract.default("middle", "feed_port"),
                      # every pod serves metrics on one port, set in each tier's config
                      # (the tiers' own defaults differ so that `iotpipe up` can run them
                      # side by side)
                      "metrics": contract.METRICS_PORT}
    config = result.find("ConfigMap", "demo-middle-config")["data"]
    assert config[contract.env("middle", "metrics_port")] == str(contract.METRICS_PORT)
    ingest = result.find("Service", "demo-ingest-headless")["spec"]["ports"]
    assert ingest[0]["port"] == contract.default("ingest", "port")
    relay = result.find("Service", "demo-relay-headless")["spec"]["ports"]
    assert relay[0]["port"] == contract.default("relay", "port")


def test_an_unknown_setting_is_refused_by_name() -> None:
    with pytest.raises(KeyError, match="IngestSettings \\(ingest\\) has no setting 'qeue'"):
        contract.env("ingest", "qeue")
    assert contract.env("ingest", "queue_bytes") == "IOTPIPE_INGEST_QUEUE_BYTES"
    assert contract.flag("drain", "node_id") == "--node-id"


def test_contract_1_settings_exist_in_the_tiers() -> None:
    for tier, field in CONTRACT_1:
        assert contract.has_setting(tier, field), (tier, field)
