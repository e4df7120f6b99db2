"""The device registry: parsing, exact/prefix lookup, reload on change, bad files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iotpipe.registry import DeviceInfo, Registry, RegistryError, RegistryWatcher

pytestmark = pytest.mark.unit

REGISTRY_YAML = """
devices:
  therm-0042: {class: thermostat-v2, location: lab, labels: {floor: 3, owner: ops}}
  boiler-1:
    class: boiler
    location: plant-a/hall-2
prefixes:
  therm-: {class: thermometer, location: plant-a}
  therm-9: {class: thermometer-fast, location: plant-b, labels: {tier: gold}}
  pump: {}
"""


def test_exact_id_wins_over_prefix() -> None:
    registry = Registry.from_yaml(REGISTRY_YAML)
    assert registry.lookup("therm-0042") == DeviceInfo(
        "thermostat-v2", "lab", {"floor": "3", "owner": "ops"}
    )


def test_longest_prefix_wins() -> None:
    registry = Registry.from_yaml(REGISTRY_YAML)
    assert registry.lookup("therm-0001") == DeviceInfo("thermometer", "plant-a", {})
    assert registry.lookup("therm-9001") == DeviceInfo(
        "thermometer-fast", "plant-b", {"tier": "gold"}
    )
    # Asking twice (memoised path) gives the same answer.
    assert registry.lookup("therm-9001") == registry.lookup("therm-9001")


def test_missing_fields_are_unknown_and_unmatched_is_none() -> None:
    registry = Registry.from_yaml(REGISTRY_YAML)
    assert registry.lookup("boiler-1") == DeviceInfo("boiler", "plant-a/hall-2", {})
    assert registry.lookup("pump-7") == DeviceInfo("unknown", "unknown", {})
    assert registry.lookup("valve-1") is None
    assert registry.lookup("therm") is None  # shorter than every prefix it resembles


def test_empty_document_is_empty_registry() -> None:
    assert len(Registry.from_yaml("")) == 0
    assert Registry.from_yaml("devices:\n").lookup("x") is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- a\n- b\n", "expected a map"),
        ("device: {}\n", "unknown top-level key(s) ['device']"),
        ("devices: [a, b]\n", "'devices' must be a map"),
        ("devices: {a: {klass: x}}\n", "devices.a: unknown field(s) ['klass']"),
        ("devices: {a: {labels: [x]}}\n", "devices.a.labels: expected a map"),
        ("devices: {a: {class: [x]}}\n", "devices.a.class: expected a string"),
        ("devices: {a: [1]\n", "not valid YAML"),
        ("prefixes: {'': {class: x}}\n", "empty prefix"),
    ],
)
def test_bad_documents_name_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(RegistryError) as info:
        Registry.from_yaml(text, source="reg.yaml")
    assert fragment in str(info.value)


def test_from_file_missing_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"nope\.yaml"):
        Registry.from_file(tmp_path / "nope.yaml")


def _write(path: Path, text: str, mtime_bump: int) -> None:
    path.write_text(text)
    # Make the change visible even on file systems with coarse mtime.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + mtime_bump * 1_000_000_000))


def test_watcher_reloads_on_change_and_keeps_old_on_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    _write(path, "devices: {a: {class: one}}\n", 0)
    watcher = RegistryWatcher(path, interval_s=0.0)
    assert watcher.current.lookup("a") == DeviceInfo("one", "unknown", {})
    assert watcher.version == 1

    _write(path, "devices: {a: {class: two}}\n", 1)
    assert watcher.current.lookup("a") == DeviceInfo("two", "unknown", {})
    assert watcher.version == 2

    _write(path, "devices: {a: {class: [broken}\n", 2)
    assert watcher.current.lookup("a") == DeviceInfo("two", "unknown", {})
    assert watcher.version == 2

    path.unlink()
    assert watcher.current.lookup("a") == DeviceInfo("two", "unknown", {})

    _write(path, "devices: {a: {class: three}}\n", 3)
    assert watcher.current.lookup("a") == DeviceInfo("three", "unknown", {})
    assert watcher.version == 3


def test_watcher_checks_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    _write(path, "devices: {a: {class: one}}\n", 0)
    watcher = RegistryWatcher(path, interval_s=3600.0)
    _write(path, "devices: {a: {class: two}}\n", 1)
    assert watcher.current.lookup("a") == DeviceInfo("one", "unknown", {})
    assert watcher.reload_if_changed() is True
    assert watcher.current.lookup("a") == DeviceInfo("two", "unknown", {})


def test_watcher_starts_without_file(tmp_path: Path) -> None:
    path = tmp_path / "later.yaml"
    watcher = RegistryWatcher(path, interval_s=0.0)
    assert watcher.current.lookup("a") is None
    _write(path, "prefixes: {a: {location: here}}\n", 0)
    assert watcher.current.lookup("abc") == DeviceInfo("unknown", "here", {})
