"""The middle's files beside its log: the dedup marks checkpoint, and marks rebuilt from the log.

The checkpoint is written atomically; on open, the marks are the checkpoint's plus those of
every retained log record after the checkpoint's ``log_seq``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from iotpipe import wire
from iotpipe.durable import write_atomic
from iotpipe.middle.dedup import CheckpointError, NodeMarks, decode_checkpoint
from iotpipe.queue import PersistentQueue

__all__ = ["CHECKPOINT_FILE", "QUEUE_DIR", "read_checkpoint", "rebuild_marks", "write_checkpoint"]

log = logging.getLogger("iotpipe.middle")

CHECKPOINT_FILE = "marks.ckpt"
QUEUE_DIR = "queue"


def write_checkpoint(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    write_atomic(path, data)


def read_checkpoint(path: Path, max_holes: int) -> tuple[int, NodeMarks]:
    """(log_seq, marks) from the checkpoint file; (0, empty) when there is none or it is bad."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, NodeMarks(max_holes)
    try:
        ckpt = decode_checkpoint(data, max_holes)
    except CheckpointError as exc:
        log.error("marks checkpoint unusable, rebuilding dedup marks from the retained log "
                  "only", extra={"fields": {"path": str(path), "error": str(exc)}})
        return 0, NodeMarks(max_holes)
    return ckpt.log_seq, ckpt.marks


def rebuild_marks(queue: PersistentQueue, log_seq: int, marks: NodeMarks) -> int:
    """Add the marks of every retained record after ``log_seq``; the number of records read."""
    seq = max(log_seq + 1, queue.first_seq)
    scanned = 0
    run_node, run_first, run_last = "", 0, -1
    while seq < queue.next_seq:
        records = queue.read(seq, max_records=8192, max_bytes=64 << 20)
        if not records:
            break
        for record in records:
            try:
                node, node_seq, _ = wire.decode_log_record(record.payload)
            except wire.WireError as exc:
                log.error("undecodable log record skipped while rebuilding marks",
                          extra={"fields": {"seq": record.seq, "error": str(exc)}})
                continue
            if node == run_node and node_seq == run_last + 1:
                run_last = node_seq
                continue
            if run_last >= run_first and run_node:
                marks.add(run_node, run_first, run_last)
            run_node, run_first, run_last = node, node_seq, node_seq
        scanned += len(records)
        seq = records[-1].seq + 1
    if run_node and run_last >= run_first:
        marks.add(run_node, run_first, run_last)
    return scanned
