"""Opening a queue directory: lock it, find and check its segments, cut a torn tail.

Only the last segment can have an unsynced tail (a segment is synced before the next one
is created), so only it is scanned here; older segments take their extent from the next
segment's header and are checked when first read (``reader.ensure_scanned``).
"""

from __future__ import annotations

import logging
import os
import re

from . import pmem as pmem_binding
from .cursors import Cursors
from .errors import QueueCorrupted, QueueError, QueueLocked
from .fileio import OS_FILE_IO, FileIO
from .framing import SEGMENT_HEADER_BYTES, decode_segment_header, find_later_write
from .ledger import Ledger
from .segments import Segment, SegmentState, index_records, segment_name

__all__ = ["LOCK_NAME", "recover"]

_log = logging.getLogger("iotpipe.queue")

LOCK_NAME = "LOCK"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")


def recover(path: str, file_io: FileIO, capacity_bytes: int, segment_bytes: int,
            persist: str, consumer_names: list[str]) -> tuple[SegmentState, Cursors]:
    """Open (creating if missing) the queue in ``path``: its segment state and cursors.

    Raises QueueLocked, QueueCorrupted or QueueError with every file it opened closed.
    """
    state = SegmentState(path, file_io, capacity_bytes, segment_bytes)
    cursors: Cursors | None = None
    try:
        file_io.makedirs(path)
        state.lock_handle = _lock(file_io, path)
        names = file_io.listdir(path)
        for name in names:
            if name.endswith(".tmp"):  # a segment or ledger creation that never completed
                file_io.unlink(os.path.join(path, name))
        ledger = Ledger(file_io, path)
        cursors = Cursors(state, ledger, dict(ledger.cursors))
        _load_segments(state, sorted(int(m.group(1)) for m in map(_SEGMENT_NAME.match, names)
                                     if m))
        if not state.segments:
            if any(acked > 0 for acked in cursors.acked_by.values()):
                raise QueueCorrupted(path, 0, "no segment files, but the ledger has "
                                     f"acknowledged records: {cursors.acked_by}")
            state.create_file(state.new_segment(1), previous_end=0)
        else:
            _recover_tail(state, state.segments[-1])
        tail = state.segments[-1]
        state.next_seq = tail.last_seq + 1
        state.durable_seq = tail.last_seq
        state.tail_offset = tail.end
        _check_cursors(state, cursors.acked_by, ledger.path)
        new = [name for name in dict.fromkeys(consumer_names) if name not in cursors.acked_by]
        if new:
            updated = dict(cursors.acked_by)
            for name in new:
                updated[name] = state.segments[0].first_seq - 1
            ledger.write(updated)
            cursors.acked_by = updated
        _choose_persist_mode(state, persist)
        with state.cond:
            cursors.reclaim_locked()
        free = file_io.free_bytes(path)
        if free < capacity_bytes - state.allocated:
            _log.warning("queue %s: capacity %d bytes but only %d bytes free on disk; "
                         "appends will be refused as full before the capacity is reached",
                         path, capacity_bytes, free + state.allocated)
    except BaseException:
        if cursors is not None:
            cursors.close()
        state.release()
        raise
    return state, cursors


def _lock(file_io: FileIO, path: str) -> object:
    lock_path = os.path.join(path, LOCK_NAME)
    try:
        return file_io.lock(lock_path)
    except BlockingIOError:
        holder = ""
        try:
            with open(lock_path) as lock_file:
                holder = lock_file.read().strip()
        except OSError:
            pass
        raise QueueLocked(
            f"queue {path} is already open (lock {lock_path} held"
            + (f" by pid {holder})" if holder else ")")
            + "; one process per queue directory"
        ) from None


def _load_segments(state: SegmentState, found: list[int]) -> None:
    """Open the segment files (first seqs ``found``, ascending) and check their headers."""
    io = state.io
    for first_seq in found:
        segment_path = os.path.join(state.path, segment_name(first_seq))
        handle = io.open(segment_path, create=False)
        size = io.size(handle)
        segment = Segment(segment_path, first_seq, size)
        segment.handle = handle
        segment.created = True
        segment.scanned = False
        state.segments.append(segment)
        state.allocated += size
        try:
            header_seq, header_size, previous_end = decode_segment_header(
                io.pread(handle, SEGMENT_HEADER_BYTES, 0))
        except ValueError as exc:
            raise QueueCorrupted(segment_path, 0, str(exc)) from None
        if header_seq != first_seq or header_size != size:
            raise QueueCorrupted(segment_path, 0, f"header says first seq {header_seq}, "
                                 f"{header_size} bytes; file is {size} bytes")
        if len(state.segments) >= 2:
            previous = state.segments[-2]
            if not SEGMENT_HEADER_BYTES <= previous_end <= previous.size:
                raise QueueCorrupted(segment_path, 0, f"previous segment end {previous_end}"
                                     f" is outside {previous.path}")
            # Sealed and synced: its extent is known without a scan.
            previous.end, previous.last_seq = previous_end, first_seq - 1


def _recover_tail(state: SegmentState, segment: Segment) -> None:
    """Scan the last segment, cut a torn tail, and fail on damage inside synced data."""
    io = state.io
    data = io.pread(segment.handle, segment.size, 0)
    result = index_records(segment, data, segment.size)
    offset, seq = result.offset, result.next_seq
    later = find_later_write(data, offset, segment.size, seq - 1)
    if later is not None:
        raise QueueCorrupted(segment.path, offset, f"{result.stop} at seq {seq}, but intact "
                             f"records written after it follow at offset {later}")
    if data.count(b"\0", offset) != segment.size - offset:
        # Zero everything past the last intact record, and sync, so stale bytes can never
        # line up behind records appended later. Zeros are written rather than the file
        # truncated and preallocated again: a crash in between would leave a short file.
        garbage_end = (len(data.rstrip(b"\0")) + 7) & ~7
        io.pwrite(segment.handle, bytes(garbage_end - offset), offset)
        io.fdatasync(segment.handle)
    segment.end = offset
    segment.last_seq = seq - 1
    segment.scanned = True


def _check_cursors(state: SegmentState, acked_by: dict[str, int], ledger_path: str) -> None:
    """Every cursor must lie within the records that exist."""
    first_seq = state.segments[0].first_seq
    for name, acked in acked_by.items():
        if acked > state.durable_seq:
            raise QueueCorrupted(ledger_path, 0, f"consumer {name!r} acked seq {acked}"
                                 f" but the last record is {state.durable_seq}")
        if acked < first_seq - 1:
            raise QueueCorrupted(state.path, 0, f"records {acked + 1}..{first_seq - 1} not "
                                 f"yet acked by {name!r} are missing (segment files gone)")


def _choose_persist_mode(state: SegmentState, requested: str) -> None:
    """Map the tail for libpmem when asked and possible; else keep pwrite + fdatasync."""
    if requested == "fdatasync":
        return
    if state.io is not OS_FILE_IO:
        if requested == "pmem":
            raise QueueError("persist='pmem' needs real files (a custom file_io was given)")
        return
    try:
        mapping = pmem_binding.PmemMapping(state.segments[-1].path)
    except (pmem_binding.PmemUnavailable, OSError) as exc:
        if requested == "pmem":
            raise QueueError(f"persist='pmem' but {exc}") from exc
        return
    if not mapping.is_pmem:
        mapping.close()
        if requested == "pmem":
            raise QueueError(
                f"persist='pmem' but {state.path} is not on persistent memory "
                "(pmem_is_pmem is false; use a DAX mount, or PMEM_IS_PMEM_FORCE=1 in tests)")
        return
    state.segments[-1].mapping = mapping
    state.persist_mode = "pmem"
    if os.environ.get("PMEM_IS_PMEM_FORCE") == "1":
        _log.warning("queue %s uses the pmem backend because PMEM_IS_PMEM_FORCE=1: on a "
                     "file that is not persistent memory, appends are NOT durable",
                     state.path)
