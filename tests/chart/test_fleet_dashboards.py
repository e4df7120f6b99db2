"""The chart's Grafana dashboards: each loads as a dashboard, and the fleet and device
dashboards query only the series and labels the VictoriaMetrics sink really writes.

The unit tests read the JSON; the integration test writes a simulated fleet through the
real sink into a real victoria-metrics and runs every query and variable of the fleet and
device dashboards against it: each must find data.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.processes import ProcessGroup
from support.storage import start_victoria_metrics

from iotpipe.fleet import fleet_registry_yaml
from iotpipe.registry import Registry
from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import SinkBatch, open_sink
from iotpipe.storage.sinks.victoriametrics import VictoriaMetricsSink, line_for
from iotpipe_tools.simulate.payloads import FleetSensor

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO / "charts" / "iotpipe-operator" / "dashboards"
FLEET_DASHBOARDS = ("iotpipe-fleet.json", "iotpipe-device.json")
# Grafana's own variables (not defined in templating).
BUILTINS = {"__rate_interval", "__interval", "__range", "__all", "__data", "__name",
            "__field", "__series", "__value", "__from", "__to", "__dashboard"}
PANEL_TYPES = {"stat", "timeseries", "bargauge", "table", "gauge", "piechart", "text", "row",
               "barchart", "heatmap", "state-timeline"}


def load(name: str) -> dict[str, Any]:
    return dict(json.loads((DASHBOARDS / name).read_text()))


def all_dashboards() -> list[str]:
    return sorted(path.name for path in DASHBOARDS.glob("*.json"))


def exprs_of(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text: panel targets and variable queries."""
    out = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return out


def sink_labels() -> set[str]:
    """The label names the VictoriaMetrics sink gives a reading's series (besides the
    registry's own labels, which differ per site), read from the sink's own line."""
    reading = StoredReading("d-1", "m-1", 1_796_000_000_000_000_000, 0, "n", 1, '{"t": 1}',
                            "thermometer", "hall", {})
    line = line_for(reading, "iotpipe")
    assert line is not None
    tags = line.split(" ", 1)[0].split(",")[1:]
    return {tag.split("=", 1)[0] for tag in tags} | {"__name__"}


def labels_used(expr: str) -> set[str]:
    """Label names in selectors, by/without clauses and label_values()."""
    names: set[str] = set()
    for selector in re.findall(r"\{([^{}]*)\}", expr.replace("${measurement}", "M")):
        names |= set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"", selector))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    names |= set(re.findall(r"label_values\(.*,\s*([A-Za-z_][A-Za-z0-9_]*)\)\s*$", expr))
    return names


# -- every dashboard loads ---------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("name", all_dashboards())
def test_each_dashboard_loads_as_a_grafana_dashboard(name: str) -> None:
    dashboard = load(name)
    assert isinstance(dashboard["uid"], str) and 0 < len(dashboard["uid"]) <= 40
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert (datasource["type"], datasource["query"]) == ("datasource", "prometheus")
    templated = {"type": "prometheus", "uid": "${datasource}"}
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == templated, var["name"]
    panels = dashboard["panels"]
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert set(panel["gridPos"]) >= {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"] == templated, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == templated
            assert target["expr"].strip()
    # Every $variable used is defined (or one of Grafana's own).
    text = json.dumps(panels) + json.dumps(list(exprs_of(dashboard)))
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    undefined = used - set(variables) - BUILTINS
    assert not undefined, f"{name}: undefined variables {sorted(undefined)}"


@pytest.mark.unit
def test_dashboard_uids_are_distinct_and_the_pipeline_dashboard_stays() -> None:
    uids = [load(name)["uid"] for name in all_dashboards()]
    assert len(uids) == len(set(uids))
    assert {"iotpipe-pipeline", "iotpipe-fleet", "iotpipe-device"} <= set(uids)


# -- the fleet dashboards use the sink's series and labels -------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("name", FLEET_DASHBOARDS)
def test_fleet_dashboards_query_only_what_the_victoriametrics_sink_writes(name: str) -> None:
    dashboard = load(name)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    # Series are <measurement>_<field>: the variable's default is the sink's.
    default_measurement = VictoriaMetricsSink.from_url("victoriametrics://vm:8428").measurement
    assert variables["measurement"]["query"] == default_measurement
    allowed = sink_labels()
    assert allowed == {"device_id", "class", "location", "__name__"}
    for expr in exprs_of(dashboard):
        unknown = labels_used(expr) - allowed
        assert not unknown, f"{name}: {expr!r} uses labels the sink never writes: {unknown}"
        # The metric is always picked by __name__ among the sink's series (never a tier
        # metric: those carry no device_id label) and never spelled out literally.
        assert not re.search(r"\biotpipe_[a-z]", expr), expr
        for matcher in re.findall(r'__name__\s*(?:=~|=)\s*"([^"]*)"', expr):
            assert matcher in ("${measurement}_.+", "$field"), (expr, matcher)
        assert "device_id" in expr, f"{expr!r} could match pipeline metrics too"
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            legend_labels = set(re.findall(r"\{\{\s*([A-Za-z_]+)\s*\}\}", target["legendFormat"]))
            assert legend_labels <= allowed, (panel["title"], legend_labels)


@pytest.mark.unit
def test_the_selectors_the_test_reads_are_the_ones_it_checks() -> None:
    # The label scanner itself: a wrong scanner would pass any dashboard.
    assert labels_used('count by (class, device_id) ({__name__=~"${measurement}_.+", '
                       'floor="3", location!=""})') == {"class", "device_id", "floor",
                                                        "location", "__name__"}
    assert labels_used('label_values({device_id!=""}, zone)') == {"device_id", "zone"}


# -- against a real victoria-metrics -----------------------------------------------------


@pytest.fixture
def victoria(procs: ProcessGroup, tmp_path: Path) -> Iterator[int]:
    yield start_victoria_metrics(procs, tmp_path / "vm", "-search.latencyOffset=0s")


def _get(port: int, path: str, params: dict[str, str]) -> Any:
    url = f"http://127.0.0.1:{port}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = orjson.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def _substitute(text: str, values: dict[str, str]) -> str:
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        text = text.replace("${" + name + "}", value).replace("$" + name, value)
    return text


@pytest.mark.integration
def test_every_fleet_query_finds_the_series_the_sink_wrote(victoria: int) -> None:
    devices = 12
    registry = Registry.from_yaml(fleet_registry_yaml("sim-", devices))
    now = time.time()
    readings = []
    for index in range(devices):
        sensor = FleetSensor(index)
        info = registry.lookup(f"sim-{index}")
        assert info is not None
        for step in range(10):  # the last 50 seconds, 5 s apart
            ts = now - 50 + 5 * step
            readings.append(StoredReading(
                f"sim-{index}", f"m-{step}", int(ts * 1e9), int(ts * 1e9), "n", step,
                orjson.dumps(sensor.reading(ts)).decode(), info.device_class, info.location,
                info.labels))
    sink = open_sink(f"victoriametrics://127.0.0.1:{victoria}")
    assert sink.write([SinkBatch("middle-0", 1, readings)]).written == len(readings)
    sink.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{victoria}/internal/force_flush",
                                timeout=10):
        pass

    values = {"measurement": "iotpipe", "class": ".*", "location": ".*",
              "field": "iotpipe_temp_c", "device": "sim-0", "__rate_interval": "1m"}
    for name in FLEET_DASHBOARDS:
        dashboard = load(name)
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            query = _substitute(var["query"]["query"], values)
            match = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_]+)\)", query)
            assert match, query
            found = _get(victoria, f"/api/v1/label/{match.group(2)}/values",
                         {"match[]": match.group(1), "start": str(int(now - 3600))})
            assert found, f"{name}: variable {var['name']} finds nothing: {query}"
            if var["name"] == "class":
                assert set(found) == {"thermometer", "meter", "pump"}
            if var["name"] == "device":
                assert set(found) == {f"sim-{i}" for i in range(devices)}
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                query = _substitute(target["expr"], values)
                result = _get(victoria, "/api/v1/query",
                              {"query": query, "time": str(now + 1)})["result"]
                assert result, f"{name}: panel {panel['title']!r} finds nothing: {query}"
                if panel["title"] == "Devices reporting":
                    assert float(result[0]["value"][1]) == devices
                if panel["title"] == "Devices by class":
                    assert {r["metric"]["class"]: float(r["value"][1]) for r in result} == \
                        {"thermometer": 4, "meter": 4, "pump": 4}
                if panel["title"] == "Readings/s":
                    # 10 readings per device in the last 50 s, counted over one minute.
                    assert float(result[0]["value"][1]) == pytest.approx(devices * 10 / 60)
