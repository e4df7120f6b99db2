"""A queue keeps its forwarding identity across restarts; a recreated queue gets a new one.

Without the incarnation, a recreated queue (new volume, same pod name) restarts its seqs at
1 and the middle tier would drop its records as duplicates of the old queue's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from iotpipe.ingest.identity import INCARNATION_FILE, queue_node_id
from iotpipe.middle.core import Intake, NodeMarks
from iotpipe.queue import PersistentQueue
from iotpipe.wire import Batch, encode_reading

pytestmark = pytest.mark.unit


def test_identity_is_stable_per_queue_and_new_for_a_recreated_queue(tmp_path: Path) -> None:
    queue_dir = tmp_path / "p0"
    with PersistentQueue.open(queue_dir, capacity_bytes=1 << 20):
        first = queue_node_id(queue_dir, "ingest-3-p0")
    with PersistentQueue.open(queue_dir, capacity_bytes=1 << 20):
        assert queue_node_id(queue_dir, "ingest-3-p0") == first
    assert first.startswith("ingest-3-p0~") and len(first) == len("ingest-3-p0~") + 16
    shutil.rmtree(queue_dir)
    with PersistentQueue.open(queue_dir, capacity_bytes=1 << 20):
        assert queue_node_id(queue_dir, "ingest-3-p0") != first


def test_a_damaged_incarnation_file_is_replaced(tmp_path: Path) -> None:
    tmp_path.joinpath(INCARNATION_FILE).write_text("not-hex\n")
    node = queue_node_id(tmp_path, "n")
    assert node != "n~not-hex" and queue_node_id(tmp_path, "n") == node


def test_recreated_queue_is_not_taken_for_duplicates_by_the_middle(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    old = queue_node_id(tmp_path / "old", "ingest-0-p0")
    new = queue_node_id(tmp_path / "new", "ingest-0-p0")
    intake = Intake(NodeMarks())
    readings = [encode_reading("dev", str(i), i, b"{}", i) for i in range(10)]
    plan = intake.plan([(b"peer", Batch(old, 1, readings))])
    intake.committed(plan)
    assert len(plan.records) == 10
    # The recreated queue's seqs start at 1 again: they are new records, not duplicates.
    plan = intake.plan([(b"peer", Batch(new, 1, readings))])
    assert len(plan.records) == 10 and plan.duplicates == 0
