"""What a new user meets first: help text, the command line, the simulated fleet, watch."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from iotpipe import cli
from iotpipe.fleet import fleet_kind, fleet_registry_yaml
from iotpipe.registry import Registry
from iotpipe.settings import Internal, parse_settings
from iotpipe.watch import WatchSettings, format_reading, subscribe_frame
from iotpipe_tools.simulate import SimulateSettings, Simulation
from iotpipe_tools.simulate.payloads import FleetSensor
from iotpipe_tools.simulate.report import AckedIds

TIERS = {
    "ingest": ("iotpipe.ingest.server", "IngestSettings", "IOTPIPE_INGEST_"),
    "middle": ("iotpipe.middle.server", "MiddleSettings", "IOTPIPE_MIDDLE_"),
    "storage": ("iotpipe.storage.settings", "StorageSettings", "IOTPIPE_STORAGE_"),
    "relay": ("iotpipe.relay.settings", "RelaySettings", "IOTPIPE_RELAY_"),
    "up": ("iotpipe.local", "UpSettings", "IOTPIPE_UP_"),
    "simulate": ("iotpipe_tools.simulate", "SimulateSettings", "IOTPIPE_SIMULATE_"),
    "watch": ("iotpipe.watch", "WatchSettings", "IOTPIPE_WATCH_"),
}


def _help(tier: str, capsys: pytest.CaptureFixture[str]) -> str:
    module, model, _ = TIERS[tier]
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(getattr(importlib.import_module(module), model), ["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("tier", list(TIERS))
def test_help_names_env_vars_and_hides_python_types(
        tier: str, capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(tier, capsys)
    prefix = TIERS[tier][2]
    module, model, _ = TIERS[tier]
    fields = getattr(importlib.import_module(module), model).model_fields
    flat = " ".join(text.split())  # argparse wraps lines anywhere
    for name, field in fields.items():
        if field.description == Internal:
            assert f"{prefix}{name.upper()}" not in flat, (name, text)  # hidden plumbing
            continue
        assert f"{prefix}{name.upper()}" in flat, (name, text)
    for raw in ("{int,null}", "list[str]", " Path", " str ", "default factory", "{float,null}"):
        assert raw not in text, (raw, text)
    assert "--no-insecure" not in text and "--no-compression" not in text


def test_a_flag_that_turns_something_off_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from iotpipe_tools.bench.ingest import IngestBenchSettings

    relay = " ".join(_help("relay", capsys).split())
    assert ("--no-web serve the live fleet page at / and its /api/ endpoints on the WebSocket "
            "port (on by default; this flag turns it off)") in relay
    with pytest.raises(SystemExit):
        parse_settings(IngestBenchSettings, ["--help"])
    bench = " ".join(capsys.readouterr().out.split())
    assert "--no-half-rate also run open loop at half of ingest's maximum rate " \
           "(p99_ms_at_half) (on by default; this flag turns it off)" in bench
    assert not parse_settings(IngestBenchSettings, ["--no-half-rate"]).half_rate
    up = " ".join(_help("up", capsys).split())
    entry = up[up.index("--no-curve "):]
    assert "authenticate and encrypt" in entry[:entry.index("[env:")]
    assert "this flag turns it off" in entry[:entry.index("[env:")]


def test_internal_options_are_hidden_but_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    from iotpipe.ingest.server import IngestSettings

    assert "process-index" not in _help("ingest", capsys)
    settings = parse_settings(IngestSettings, ["--process-index", "2"])
    assert settings.process_index == 2


def test_each_tier_has_its_own_default_metrics_port() -> None:
    ports = {}
    for tier in ("ingest", "middle", "storage", "relay"):
        module, model, _ = TIERS[tier]
        ports[tier] = getattr(importlib.import_module(module), model).model_fields[
            "metrics_port"].default
    # The layout `iotpipe up` uses, so tiers run by hand on one host do not collide.
    assert ports == {"ingest": 9100, "middle": 9101, "storage": 9102, "relay": 9103}


@pytest.mark.parametrize("tier", ["ingest", "middle", "storage", "relay", "up"])
def test_a_bad_log_level_exits_2_naming_the_option(
        tier: str, capsys: pytest.CaptureFixture[str]) -> None:
    module, model, prefix = TIERS[tier]
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(getattr(importlib.import_module(module), model), ["--log-level", "loud"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--log-level" in err and f"{prefix}LOG_LEVEL" in err and "'loud'" in err
    # Case does not matter for a valid one.
    parsed = parse_settings(getattr(importlib.import_module(module), model),
                            ["--log-level", "WARNING"])
    assert parsed.log_level == "warning"  # type: ignore[attr-defined]


def test_plain_iotpipe_prints_usage_and_exits_2() -> None:
    result = subprocess.run([sys.executable, "-m", "iotpipe.cli"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "usage: iotpipe COMMAND" in result.stderr and "watch" in result.stderr
    assert cli.main(["--help"]) == 0


def test_json_flag_keeps_a_prefixed_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    # An alias used to make the environment variable a bare "JSON".
    monkeypatch.setenv("JSON", "true")
    assert not parse_settings(SimulateSettings, []).json_output
    assert parse_settings(SimulateSettings, ["--json"]).json_output
    monkeypatch.setenv("IOTPIPE_SIMULATE_JSON_OUTPUT", "true")
    assert parse_settings(SimulateSettings, []).json_output


# -- the simulated fleet --------------------------------------------------------------------


def test_message_ids_start_at_the_clock_in_microseconds() -> None:
    # A run sends far less than one message per microsecond per device, so the next run,
    # started later, begins above every id this one used.
    before = time.time_ns() // 1000
    first = Simulation(SimulateSettings(insecure=True)).first_id
    after = time.time_ns() // 1000
    assert before <= first <= after
    assert Simulation(SimulateSettings(insecure=True)).first_id >= first
    assert Simulation(SimulateSettings(insecure=True, first_id=7)).first_id == 7


def test_acked_ids_start_at_the_runs_first_id() -> None:
    acked = AckedIds(first=1_000)
    for msg_id in (1_000, 1_001, 1_003):
        acked.add(msg_id)
    assert acked.floor == 1_001 and list(acked) == [1_000, 1_001, 1_003] and len(acked) == 3
    assert 999 not in acked and 1_002 not in acked and 1_003 in acked


def test_fleet_devices_send_plausible_drifting_values() -> None:
    assert [fleet_kind(i) for i in range(4)] == ["thermometer", "meter", "pump", "thermometer"]
    now = 1_800_000_000.0
    therm, meter, pump = FleetSensor(0), FleetSensor(1), FleetSensor(2)
    temps = [therm.reading(now + i)["temp_c"] for i in range(600)]
    assert all(10 < t < 32 for t in temps) and len(set(temps)) > 100  # drifts, stays sane
    energy = [meter.reading(now + i)["energy_kwh"] for i in range(600)]
    assert energy == sorted(energy) and energy[-1] > energy[0]  # a meter only counts up
    states = [pump.reading(now + i) for i in range(600)]
    assert {s["running"] for s in states} == {True, False}  # pumps switch now and then
    assert all(s["flow_lpm"] == 0.0 for s in states if not s["running"])
    assert all(60 <= s["flow_lpm"] <= 180 for s in states if s["running"])


def test_fleet_registry_gives_classes_and_locations() -> None:
    registry = Registry.from_yaml(fleet_registry_yaml("sim-", 6))
    infos = [registry.lookup(f"sim-{i}") for i in range(6)]
    assert [i.device_class for i in infos if i] == ["thermometer", "meter", "pump"] * 2
    assert len({i.location for i in infos if i}) >= 2
    stray = registry.lookup("sim-99")
    assert stray is not None and stray.device_class == "simulated"
    assert Registry.from_yaml(fleet_registry_yaml("sim-", 0)).lookup("sim-0") is not None


# -- iotpipe watch ------------------------------------------------------------------------


def test_watch_subscribes_to_everything_unless_told_otherwise() -> None:
    assert subscribe_frame(WatchSettings()) == b'{"op":"subscribe","all":true}'
    frame = subscribe_frame(parse_settings(WatchSettings, ["--classes", "pump,meter"]))
    assert frame == b'{"op":"subscribe","classes":["pump","meter"]}'


def test_watch_prints_one_line_per_reading() -> None:
    frame: dict[str, Any] = {"event": "reading", "device": "sim-0", "id": 17,
                             "received": 1_764_163_200_123_000_000, "data": {"temp_c": 21.5}}
    assert format_reading(frame) == '13:20:00.123  sim-0  17  {"temp_c":21.5}'


def test_up_writes_the_fleet_registry_but_never_a_users_own(tmp_path: Path) -> None:
    from iotpipe.fleet import OLD_SAMPLE_REGISTRY, write_registry

    path = tmp_path / "registry.yaml"
    write_registry(path, 3)
    assert Registry.from_yaml(path.read_text()).lookup("sim-2").device_class == "pump"  # type: ignore[union-attr]
    write_registry(path, 6)  # still generated: follows the fleet size
    assert Registry.from_yaml(path.read_text()).lookup("sim-5").device_class == "pump"  # type: ignore[union-attr]
    path.write_text(OLD_SAMPLE_REGISTRY)  # what earlier versions generated
    write_registry(path, 3)
    assert Registry.from_yaml(path.read_text()).lookup("sim-0").device_class == "thermometer"  # type: ignore[union-attr]
    own = "devices:\n  sim-0: {class: boiler, location: cellar}\n"
    path.write_text(own)
    write_registry(path, 3)
    assert path.read_text() == own
