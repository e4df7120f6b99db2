"""``iotpipe-operator validate``: the API server's checks before anything is applied, and
``render`` refusing whatever validate refuses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from iotpipe_operator import cli, validation

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SAMPLES = sorted((REPO / "samples").glob("*.yaml"))
INVALID = sorted((REPO / "samples" / "invalid").glob("*.yaml"))


def _header(path: Path) -> tuple[str | None, str]:
    match = re.match(r"# INVALID(?: UPDATE of (\S+))?: (.+)$", path.read_text().splitlines()[0])
    assert match, path
    return match.group(1), match.group(2)


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_validate_refuses_each_invalid_sample_naming_the_field(
        path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, message = _header(path)
    argv = ["validate", "-f", str(path)] + (["--old", str(REPO / old)] if old else [])
    assert cli.main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert any(message in line for line in errors), errors
    # every error starts with the path of the field it is about
    for line in errors:
        field = line.split(": error: ", 1)[1].split(":", 1)[0]
        assert re.fullmatch(r"(<root>|[a-zA-Z]+(\.[a-zA-Z]+|\[\d+\])*)", field), line
        assert field == "<root>" or field.startswith(("spec", "metadata")), line


@pytest.mark.parametrize("path", [p for p in INVALID if _header(p)[0] is None],
                         ids=lambda p: p.name)
def test_render_refuses_what_validate_refuses(path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _, message = _header(path)
    assert cli.main(["render", "-f", str(path)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == ""


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_valid_samples_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "-f", str(path)]) == 0
    assert "valid IoTPipeline" in capsys.readouterr().out


def test_update_validation_uses_transition_rules(capsys: pytest.CaptureFixture[str]) -> None:
    path = REPO / "samples" / "invalid" / "queue-shrink.yaml"
    assert cli.main(["validate", "-f", str(path)]) == 0, "a shrink is only wrong as an update"
    capsys.readouterr()


def _pipeline(**spec: object) -> dict[str, object]:
    return {"apiVersion": "iotpipe.dev/v1alpha1", "kind": "IoTPipeline",
            "metadata": {"name": "w"},
            "spec": {"ingest": {"auth": {"secretName": "s"}}, **spec}}


def test_crash_loop_warnings() -> None:
    report = validation.validate(_pipeline(storage={"sinks": ["sqlite:///data/x.db"]}))
    assert report.ok
    assert any(w.startswith("spec.storage.sinks[0]:") and "read-only" in w
               for w in report.warnings), report.warnings
    ok = validation.validate(_pipeline(storage={
        "sinks": ["sqlite:///var/lib/iotpipe/store/x.db"]}))
    assert ok.ok and ok.warnings == []
    frame = validation.validate(_pipeline(ingest={
        "auth": {"secretName": "s"}, "processes": 4, "maxFrameBytes": 64 * 2**20,
        "queue": {"size": "128Mi"}}))
    assert any(w.startswith("spec.ingest.maxFrameBytes") for w in frame.warnings)
    plain = validation.validate(_pipeline(security={"curve": {"enabled": False}},
                                          networkPolicy={"enabled": False}))
    assert plain.ok
    assert plain.warnings == ["spec.security.curve.enabled: the ZeroMQ links are plain; any "
                              "pod that reaches the middle's ports can inject or read "
                              "readings (and networkPolicy is off: any pod in the cluster)"]


def test_unknown_fields_and_identity_are_reported() -> None:
    report = validation.validate(_pipeline(metrics={"servicemonitor": True}, extra=1))
    assert "spec.metrics.servicemonitor: unknown field" in report.errors
    assert "spec.extra: unknown field" in report.errors
    # open objects (env entries, resources, network peers) keep unknown fields
    env = [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]
    assert validation.validate(_pipeline(relay={"env": env})).ok
    wrong = validation.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}})
    assert wrong.errors[:2] == ["apiVersion: must be iotpipe.dev/v1alpha1, not 'v1'",
                                "kind: must be IoTPipeline, not 'ConfigMap'"]


def test_validate_names_unreadable_input(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.yaml"
    bad.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap"}))
    assert cli.main(["validate", "-f", str(bad)]) == 2
    assert "expected exactly one IoTPipeline document" in capsys.readouterr().err
    assert cli.main(["validate", "-f", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
