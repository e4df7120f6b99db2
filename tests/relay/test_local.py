"""``iotpipe up`` building blocks: port plan, child commands, restart policy, supervisor."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from support.waiting import wait_for

from iotpipe.auth import CLIENT_AUDIENCE, verify_token
from iotpipe.local import UpSettings, build_children, live_page_url, plan_ports
from iotpipe.settings import parse_settings
from iotpipe.supervisor import ChildSpec, RestartPolicy, Supervisor

pytestmark = pytest.mark.unit


def test_ports_default_to_the_contract() -> None:
    ports = plan_ports(UpSettings())
    assert (ports.ingest, ports.relay, ports.middle_router, ports.middle_pub,
            ports.middle_feed) == (8080, 8081, 5555, 5556, 5557)
    assert len({ports.ingest_metrics, ports.middle_metrics, ports.storage_metrics,
                ports.relay_metrics}) == 4


def test_base_port_and_overrides() -> None:
    ports = plan_ports(UpSettings(base_port=20000, relay_port=30000))
    assert ports.ingest == 20000 and ports.relay == 30000 and ports.relay_metrics == 20008
    with pytest.raises(ValueError, match="port 20000 is given to both ingest and relay"):
        plan_ports(UpSettings(base_port=20000, relay_port=20000))


def test_children_point_at_each_other(tmp_path: Path) -> None:
    (tmp_path / "auth.secret").write_text("s3cret\n")
    settings = UpSettings(base_port=21000, simulate=5)
    ports = plan_ports(settings)
    specs = build_children(settings, ports, tmp_path, tmp_path / "registry.yaml",
                           tmp_path / "auth.secret")
    by_name = {spec.name: spec for spec in specs}
    assert list(by_name) == ["middle", "storage", "relay", "ingest", "simulate"]
    joined = {name: " ".join(spec.argv) for name, spec in by_name.items()}
    assert f"--middle-endpoints tcp://127.0.0.1:{ports.middle_router}" in joined["ingest"]
    assert f"--middle-pub-endpoints tcp://127.0.0.1:{ports.middle_pub}" in joined["relay"]
    assert f"--feed-endpoints tcp://127.0.0.1:{ports.middle_feed}" in joined["storage"]
    assert f"sqlite://{tmp_path}/store/readings.db" in joined["storage"]
    assert f"ws://127.0.0.1:{ports.ingest}/v1/ingest" in joined["simulate"]
    assert by_name["ingest"].env == {"IOTPIPE_AUTH_SECRET_FILE": str(tmp_path / "auth.secret")}
    assert not by_name["simulate"].restart and by_name["middle"].restart
    # The simulator mints device tokens from the same secret file as ingest checks them with.
    assert by_name["simulate"].env == by_name["ingest"].env
    no_auth = build_children(UpSettings(insecure_no_auth=True), ports, tmp_path,
                             tmp_path / "r.yaml", None)
    assert all("--insecure-no-auth" in s.argv for s in no_auth if s.name in ("ingest", "relay"))
    # Without keys the ZeroMQ links are plain; with them every tier uses the same directory.
    assert not any("--curve-keys-dir" in s.argv for s in specs)
    curved = build_children(settings, ports, tmp_path, tmp_path / "registry.yaml",
                            tmp_path / "auth.secret", tmp_path / "curve")
    for spec in curved:
        tier = spec.name != "simulate"
        assert ("--curve-keys-dir" in spec.argv) is tier, spec.argv
        if tier:
            assert spec.argv[spec.argv.index("--curve-keys-dir") + 1] == str(tmp_path / "curve")


_TIER_SETTINGS = {
    "middle": ("iotpipe.middle.server", "MiddleSettings"),
    "storage": ("iotpipe.storage.settings", "StorageSettings"),
    "relay": ("iotpipe.relay.settings", "RelaySettings"),
    "ingest": ("iotpipe.ingest.server", "IngestSettings"),
    "simulate": ("iotpipe_tools.simulate", "SimulateSettings"),
}


@pytest.mark.parametrize("tier", list(_TIER_SETTINGS))
def test_every_child_command_parses_with_its_tier_settings(tier: str, tmp_path: Path) -> None:
    """The flags `iotpipe up` passes must exist in each tier's settings model."""
    module_name, model_name = _TIER_SETTINGS[tier]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        pytest.fail(f"{module_name} is missing: `iotpipe up` cannot start the {tier} tier")
    model = getattr(module, model_name, None)
    if model is None:  # the tier names its model differently: find the settings class
        candidates = [v for k, v in vars(module).items() if k.endswith("Settings")
                      and isinstance(v, type) and v.__module__ == module_name]
        assert len(candidates) == 1, f"cannot find the settings model of {module_name}"
        model = candidates[0]
    settings = UpSettings(base_port=22000, simulate=2)
    (tmp_path / "s").write_text("secret")
    spec = next(s for s in build_children(settings, plan_ports(settings), tmp_path,
                                          tmp_path / "r.yaml", tmp_path / "s")
                if s.name == tier)
    argv = spec.argv[spec.argv.index(tier) + 1:]
    parsed = parse_settings(model, argv)
    if tier == "simulate":
        assert parsed.connections == 2  # type: ignore[attr-defined]
    else:
        assert parsed.host == "127.0.0.1"  # type: ignore[attr-defined]


def test_restart_policy_backs_off_and_forgives() -> None:
    policy = RestartPolicy(initial_s=0.5, factor=2, max_s=4, stable_s=30)
    assert [policy.delay(n) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0]
    assert policy.failures_after_exit(3, uptime_s=1.0) == 4
    assert policy.failures_after_exit(3, uptime_s=60.0) == 1


def _sleeper(name: str, restart: bool = True, seconds: float = 60) -> ChildSpec:
    return ChildSpec(name, [sys.executable, "-c", f"import time; time.sleep({seconds})"],
                     restart=restart)


@pytest.mark.timeout(30)
def test_supervisor_restarts_a_dead_child_and_stops_all(tmp_path: Path) -> None:
    supervisor = Supervisor(
        [_sleeper("a"), _sleeper("b"), _sleeper("once", restart=False, seconds=0)],
        tmp_path, RestartPolicy(initial_s=0.1, max_s=0.2), stop_timeout=5)
    try:
        supervisor.start_all()
        victim = supervisor.children[0]
        assert victim.proc is not None
        first_pid = victim.proc.pid
        victim.proc.kill()
        def restarted() -> bool:
            supervisor.poll()
            return victim.restarts > 0 and supervisor.children[2].done

        wait_for(restarted, 10, "the killed child restarted and the one-shot child done")
        assert victim.restarts == 1 and victim.proc is not None
        assert victim.proc.pid != first_pid and victim.proc.poll() is None
        assert supervisor.children[2].done and supervisor.children[2].proc is None
        assert supervisor.stop_all() == 0
        assert all(c.proc is None or c.proc.poll() is not None for c in supervisor.children)
    finally:
        for child in supervisor.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.kill()


def test_up_settings_from_flags() -> None:
    settings = parse_settings(UpSettings, ["--data-dir", "/tmp/x", "--simulate", "3",
                                           "--insecure-no-auth", "--base-port", "9000"])
    assert settings.simulate == 3 and settings.insecure_no_auth and settings.base_port == 9000


def test_up_wires_the_live_page_and_prints_its_url_with_a_client_token(tmp_path: Path) -> None:
    secret_file = tmp_path / "auth.secret"
    secret_file.write_text("a-local-secret-of-thirty-two-bytes!\n")
    settings = UpSettings(base_port=21000)
    ports = plan_ports(settings)
    specs = {spec.name: " ".join(spec.argv) for spec in build_children(
        settings, ports, tmp_path, tmp_path / "registry.yaml", secret_file)}
    assert "--read-api" in specs["storage"]
    assert f"--history-urls http://127.0.0.1:{ports.storage_metrics}" in specs["relay"]
    for tier, port in (("ingest", ports.ingest_metrics), ("middle", ports.middle_metrics),
                       ("storage", ports.storage_metrics)):
        assert f"{tier}=http://127.0.0.1:{port}/metrics" in specs["relay"]
    url = live_page_url("127.0.0.1", ports.relay, secret_file)
    prefix = f"http://127.0.0.1:{ports.relay}/?token="
    assert url.startswith(prefix)
    secret = secret_file.read_bytes().strip()
    assert verify_token(secret, url.removeprefix(prefix), CLIENT_AUDIENCE) == "live-page"
    assert live_page_url("127.0.0.1", 8081, None) == "http://127.0.0.1:8081/"


def test_up_takes_the_contract_without_the_operator_package() -> None:
    """`iotpipe up` names its flags through iotpipe.contract, which must not need the
    operator extra (kopf, kubernetes) installed."""
    code = ("import sys, iotpipe.local, iotpipe.contract\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('iotpipe_operator', 'kopf', 'kubernetes'))\n"
            "assert not bad, bad\n"
            "assert iotpipe.contract.flag('relay', 'history_urls') == '--history-urls'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
