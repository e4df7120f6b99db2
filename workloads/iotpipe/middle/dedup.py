"""Dedup marks: per ingest node, which node sequence numbers are already in the middle log.

In the normal case a node's marks are one range ``[first_seen, high_water_mark]``: a node
sends to one middle at a time, in sequence order, and resends everything unacknowledged from
the lowest on failover. A batch entirely inside the marks is a duplicate (acknowledged, not
stored); a batch straddling the high-water mark stores only the new part.

The marks are a set of ranges rather than a single number because a plain high-water mark
loses data when a batch *skips ahead*: if batch 3 of a window is lost in a dropped TCP
connection (or refused with ``busy``) and batch 4 is stored, a single mark of 4 would make
the resent batch 3 look like a duplicate. With ranges, the hole stays open and the resent
batch 3 is stored. Holes that legitimately never fill (a node failed over to another middle
for a while, then came back) are bounded: beyond ``max_ranges`` per node the oldest hole is
closed, on the grounds that a node never resends what it saw acknowledged long ago.

The checkpoint codec turns the marks into bytes (magic, CRC32C, msgpack body) and back.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import google_crc32c
import msgpack

from iotpipe.middle.intervals import IntervalSet

__all__ = [
    "CheckpointError",
    "MarksCheckpoint",
    "NodeMarks",
    "decode_checkpoint",
    "encode_checkpoint",
]


class NodeMarks:
    """Which node sequence numbers of each ingest node are already in the log."""

    def __init__(self, max_ranges: int = 256) -> None:
        if max_ranges < 1:
            raise ValueError("max_ranges must be >= 1")
        self.max_ranges = max_ranges
        self._nodes: dict[str, IntervalSet] = {}

    def get(self, node: str) -> IntervalSet:
        """The stored ranges of ``node`` (an empty set for an unknown node; do not mutate)."""
        return self._nodes.get(node) or IntervalSet()

    def high_water(self, node: str) -> int:
        marks = self._nodes.get(node)
        return marks.highest() if marks else 0

    def add(self, node: str, first: int, last: int) -> None:
        marks = self._nodes.get(node)
        if marks is None:
            marks = self._nodes[node] = IntervalSet()
        marks.add(first, last)
        while len(marks) > self.max_ranges:
            marks.close_lowest_hole()

    def replace(self, node: str, marks: IntervalSet) -> None:
        while len(marks) > self.max_ranges:
            marks.close_lowest_hole()
        self._nodes[node] = marks

    def nodes(self) -> list[str]:
        return list(self._nodes)

    def to_dict(self) -> dict[str, list[list[int]]]:
        return {node: [[a, b] for a, b in marks] for node, marks in self._nodes.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[Sequence[int]]], max_ranges: int = 256
                  ) -> NodeMarks:
        marks = cls(max_ranges)
        for node, ranges in data.items():
            for first, last in ranges:
                marks.add(node, first, last)
        return marks

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodeMarks) and self.to_dict() == other.to_dict()


class CheckpointError(ValueError):
    """A marks checkpoint file that is damaged or not a checkpoint."""


class MarksCheckpoint(NamedTuple):
    log_seq: int  # the marks cover every log record with seq <= log_seq
    marks: NodeMarks


_CKPT_MAGIC = b"IOTPMRK1"
_CKPT_HEADER = struct.Struct("<8sII")  # magic, crc32c of body, body length


def encode_checkpoint(log_seq: int, marks: NodeMarks) -> bytes:
    body = msgpack.packb({"log_seq": log_seq, "nodes": marks.to_dict()}, use_bin_type=True)
    return _CKPT_HEADER.pack(_CKPT_MAGIC, google_crc32c.value(body), len(body)) + body


def decode_checkpoint(data: bytes, max_ranges: int = 256) -> MarksCheckpoint:
    if len(data) < _CKPT_HEADER.size:
        raise CheckpointError("checkpoint: shorter than its header")
    magic, crc, length = _CKPT_HEADER.unpack_from(data)
    if magic != _CKPT_MAGIC:
        raise CheckpointError("checkpoint: bad magic (not a marks checkpoint)")
    body = data[_CKPT_HEADER.size:]
    if len(body) != length:
        raise CheckpointError(f"checkpoint: body is {len(body)} bytes, header says {length}")
    if google_crc32c.value(body) != crc:
        raise CheckpointError("checkpoint: checksum mismatch")
    try:
        obj = msgpack.unpackb(body, raw=False)
        log_seq = obj["log_seq"]
        nodes = obj["nodes"]
        if not isinstance(log_seq, int) or not isinstance(nodes, dict):
            raise TypeError("bad field types")
        return MarksCheckpoint(log_seq, NodeMarks.from_dict(nodes, max_ranges))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint: bad content ({exc})") from None
