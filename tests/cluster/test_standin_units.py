"""The stand-in's pure pieces: merge-patch diffing, server-side apply, path mapping,
``$(VAR)`` expansion, hosts files."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.apiserver import differs, overlay, removed_fields, taken_over
from support.cluster.kubelet import _expand, map_paths
from support.cluster.network import Addresses, hosts_text, write_in_place

pytestmark = pytest.mark.unit


def test_generation_moves_only_when_a_patch_changes_the_spec() -> None:
    spec = {"replicas": 2, "template": {"a": 1}}
    assert not differs(spec, {"replicas": 2})
    assert not differs(spec, {"gone": None})
    assert differs(spec, {"template": {"a": 2}})
    assert differs(spec, {"replicas": None})


def test_apply_removes_what_the_manager_no_longer_sets() -> None:
    previous = {"metadata": {"annotations": {"a": "1", "b": "2"}}, "spec": {"x": 1}}
    current = {"metadata": {"annotations": {"b": "2"}}, "spec": {"x": 1}}
    patch = overlay(removed_fields(previous, current), current)
    assert patch == {"metadata": {"annotations": {"a": None, "b": "2"}}, "spec": {"x": 1}}


def test_a_field_another_writer_set_survives_the_next_apply() -> None:
    applied = {"spec": {"replicas": 2, "template": {"x": 1}}}
    # the autoscaler scales: replicas is now its field
    applied = taken_over(applied, {"spec": {"replicas": 5}})
    assert applied == {"spec": {"template": {"x": 1}}}
    current = {"spec": {"template": {"x": 1}}}  # the next apply leaves replicas out
    assert removed_fields(applied, current) == {}


def test_container_paths_map_to_whole_components() -> None:
    mounts = {"/var/lib/q": Path("/pods/p/q"), "/var/lib/q/deep": Path("/d")}
    assert map_paths("sqlite:///var/lib/q/r.db", mounts) == "sqlite:///pods/p/q/r.db"
    assert map_paths("/var/lib/q/deep/x", mounts) == "/d/x"
    assert map_paths("/var/lib/queue", mounts) == "/var/lib/queue"


def test_env_references_expand_like_kubernetes() -> None:
    env = {"A": "1"}
    assert _expand("$(A)-$(B)-$$(A)", env) == "1-$(B)-$(A)"


def test_hosts_files_keep_their_inode(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("old\n")
    inode = path.stat().st_ino
    text = hosts_text({"svc": ["127.9.0.2"]}, ("127.9.1.1", ["pod-0.svc", "pod-0"]))
    assert write_in_place(path, text)
    assert path.stat().st_ino == inode
    assert "127.9.1.1\tpod-0.svc pod-0" in path.read_text()
    assert "127.9.0.2\tsvc" in path.read_text()
    assert not write_in_place(path, text), "unchanged content is not rewritten"


def test_addresses_are_loopback_and_distinct() -> None:
    addresses = Addresses()
    pods = [addresses.pod() for _ in range(600)]
    assert len(set(pods)) == 600
    assert all(p.startswith(f"127.{addresses.block}.") for p in pods)
    assert addresses.service() != addresses.service()
