"""The segment state every part of the queue shares.

``SegmentState`` holds the segment files (oldest first), their sparse indexes, the seq and
tail counters, and the one condition that guards all of it. Recovery builds it, the writer
extends it, the reader walks it and the cursors shrink it; each of them takes ``cond``
itself (the writer releases it around file writes).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import pmem as pmem_binding
from .errors import QueueClosed, QueueCorrupted, QueueError
from .fileio import FileIO
from .framing import SEGMENT_HEADER_BYTES, ParseResult, Stop, encode_segment_header, parse_records

__all__ = ["MIN_SEGMENT_BYTES", "Segment", "SegmentState", "index_records", "segment_name"]

MIN_SEGMENT_BYTES = 4096
# Sparse in-memory index: one (seq, offset) entry at least every this many records/bytes.
_INDEX_RECORDS = 256
_INDEX_BYTES = 64 << 10
_PARSE_BATCH = 256


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


class Segment:
    """One segment file. ``end``/``last_seq`` describe durable records only."""

    __slots__ = (
        "created", "end", "first_seq", "handle", "index_offsets", "index_seqs", "last_seq",
        "mapping", "path", "previous", "scanned", "size", "zeroed_until",
    )

    def __init__(self, path: str, first_seq: int, size: int) -> None:
        self.path = path
        self.first_seq = first_seq
        self.size = size
        self.handle: Any = None
        self.created = False
        self.scanned = True  # False for older segments found at open, until first needed
        self.end = SEGMENT_HEADER_BYTES
        self.last_seq = first_seq - 1
        self.index_seqs: list[int] = []
        self.index_offsets: list[int] = []
        self.mapping: pmem_binding.PmemMapping | None = None
        self.previous: Segment | None = None  # set on segments created by appends
        self.zeroed_until = 0  # bytes below this were written (zeros or records) by us

    def add_index(self, seq: int, offset: int) -> None:
        if (
            not self.index_seqs
            or seq - self.index_seqs[-1] >= _INDEX_RECORDS
            or offset - self.index_offsets[-1] >= _INDEX_BYTES
        ):
            self.index_seqs.append(seq)
            self.index_offsets.append(offset)


def index_records(segment: Segment, data: bytes, limit: int) -> ParseResult:
    """Parse ``segment``'s records in ``data[:limit]`` from its header on, indexing them.

    Returns the parse that stopped (anything but Stop.LIMIT): its ``offset`` and
    ``next_seq`` are where the intact records end.
    """
    offset, seq = SEGMENT_HEADER_BYTES, segment.first_seq
    while True:
        segment.add_index(seq, offset)
        result = parse_records(data, offset, limit, seq, None, max_records=_PARSE_BATCH)
        if result.stop != Stop.LIMIT:
            return result
        offset, seq = result.offset, result.next_seq


class SegmentState:
    """The queue's segments and counters; every field is guarded by ``cond``.

    ``segments[-1]`` is the tail; segments appended by placement stay ``created=False``
    until the writer creates their file. ``positions`` caches where reads left off.
    """

    def __init__(self, path: str, file_io: FileIO, capacity_bytes: int,
                 segment_bytes: int) -> None:
        self.path = path
        self.io = file_io
        self.capacity = capacity_bytes
        self.segment_bytes = segment_bytes
        self.cond = threading.Condition(threading.Lock())
        self.segments: list[Segment] = []
        self.allocated = 0  # bytes of segment files, including ones reserved not yet created
        self.next_seq = 1
        self.durable_seq = 0
        self.tail_offset = SEGMENT_HEADER_BYTES  # reservation offset in the last segment
        self.positions: dict[int, tuple[Segment, int]] = {}
        self.frame_hint = 256  # average framed bytes per record of the last read
        self.persist_mode = "fdatasync"
        self.failed: BaseException | None = None
        self.closed = False
        self.lock_handle: Any = None

    def check_failed(self) -> None:
        if self.failed is not None:
            raise QueueError(f"queue {self.path} failed earlier ({self.failed!r}); "
                             "reopen it to recover") from self.failed

    def check_usable(self) -> None:
        if self.closed:
            raise QueueClosed(f"queue {self.path} is closed")
        self.check_failed()

    def new_segment(self, first_seq: int) -> Segment:
        """A segment starting at ``first_seq``, counted as allocated; its file comes later."""
        segment = Segment(os.path.join(self.path, segment_name(first_seq)), first_seq,
                          self.segment_bytes)
        self.segments.append(segment)
        self.allocated += segment.size
        return segment

    def segment_after(self, segment: Segment, seq: int) -> Segment:
        """The segment after ``segment``, which must start with ``seq``."""
        following = self.segments[self.segments.index(segment) + 1]
        if following.first_seq != seq:
            raise QueueCorrupted(segment.path, segment.end, f"records end at seq {seq - 1}, but "
                                 f"the next segment starts at seq {following.first_seq}: "
                                 "records are missing")
        return following

    def create_file(self, segment: Segment, previous_end: int) -> None:
        """Create a preallocated segment as a temp file, sync it, rename it, sync the dir."""
        io = self.io
        tmp = segment.path + ".tmp"
        if io.exists(tmp):
            io.unlink(tmp)
        handle = io.open(tmp, create=True)
        try:
            io.allocate(handle, segment.size)
            io.pwrite(handle, encode_segment_header(segment.first_seq, segment.size,
                                                    previous_end), 0)
            io.fsync(handle)
            io.rename(tmp, segment.path)
            io.sync_dir(self.path)
        except BaseException:
            io.close(handle)
            raise
        segment.handle = handle
        if self.persist_mode == "pmem":
            segment.mapping = pmem_binding.PmemMapping(segment.path)
            previous = segment.previous
            mapping = previous.mapping if previous is not None else None
            if mapping is not None:  # sealed and persisted: reads go through pread
                mapping.close()
                previous.mapping = None  # type: ignore[union-attr]
        segment.created = True

    def drop_consumed(self, floor: int) -> bool:
        """Delete the sealed segments whose records are all <= ``floor``; True if any were."""
        segments = self.segments
        freed = False
        while len(segments) >= 2 and segments[1].created and segments[1].first_seq <= floor + 1:
            segment = segments.pop(0)
            self.allocated -= segment.size
            mapping = segment.mapping
            if mapping is not None:  # the writer may close it at the same time: idempotent
                mapping.close()
                segment.mapping = None
            self.io.close(segment.handle)
            segment.handle = None
            self.io.unlink(segment.path)
            freed = True
        if freed:
            self.positions = {seq: pos for seq, pos in self.positions.items()
                              if pos[0].handle is not None}
        return freed

    def release(self) -> None:
        """Close every segment file and the directory lock; the state is closed after."""
        for segment in self.segments:
            if segment.mapping is not None:
                segment.mapping.close()
                segment.mapping = None
            if segment.handle is not None:
                self.io.close(segment.handle)
                segment.handle = None
        if self.lock_handle is not None:
            self.io.unlock(self.lock_handle)
            self.lock_handle = None
        self.closed = True
