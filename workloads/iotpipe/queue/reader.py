"""Reads by seq: find a record through the sparse index, parse durable records in windows.

Every function here runs with the state's ``cond`` held and sees durable records only.
"""

from __future__ import annotations

import bisect

from .errors import QueueCorrupted
from .framing import SEGMENT_HEADER_BYTES, Record, Stop, parse_records
from .segments import Segment, SegmentState, index_records

__all__ = ["bytes_from", "ensure_scanned", "locate", "read"]

_READ_AHEAD = 64 << 10  # read this much past the byte budget: the next record likely fits
_MAX_WINDOW = 1 << 20
_MIN_WINDOW = 4096
_MAX_POSITIONS = 64


def read(state: SegmentState, from_seq: int, max_records: int, max_bytes: int) -> list[Record]:
    """Durable records with seq >= ``from_seq``, in order (at least one if any exists)."""
    start = max(from_seq, state.segments[0].first_seq)
    if start > state.durable_seq:
        return []
    segment, offset = locate(state, start)
    records: list[Record] = []
    seq = start
    remaining_bytes = max_bytes
    while seq <= state.durable_seq and len(records) < max_records:
        if offset >= segment.end:
            segment = state.segment_after(segment, seq)
            offset = SEGMENT_HEADER_BYTES
            continue
        before = len(records)
        # Read about what max_records will take (from the average framed size seen last),
        # not the whole byte budget: a pread copies every byte it is given. Too short a
        # window only costs another pread.
        want = min(segment.end - offset, max(remaining_bytes, 0) + _READ_AHEAD, _MAX_WINDOW,
                   max(state.frame_hint * (max_records - before + 1), _MIN_WINDOW))
        data = state.io.pread(segment.handle, want, offset)
        result = parse_records(data, 0, len(data), seq, records,
                               max_records=max_records - before,
                               max_bytes=remaining_bytes, at_least_one=before == 0)
        if len(records) > before:
            state.frame_hint = -(-result.offset // (len(records) - before))
        if result.stop == Stop.SHORT and result.offset == 0:
            # One record larger than the read window: read exactly that frame.
            if before and result.frame_length - 16 > remaining_bytes:
                break
            if result.frame_length > segment.end - offset:
                raise QueueCorrupted(segment.path, offset, f"record at seq {seq} runs "
                                     "past the end of the durable data")
            data = state.io.pread(segment.handle, result.frame_length, offset)
            result = parse_records(data, 0, len(data), seq, records, max_records=1)
            if result.stop != Stop.LIMIT:
                raise QueueCorrupted(segment.path, offset, f"{result.stop} at seq {seq} "
                                     "inside durable data")
            remaining_bytes -= len(records[-1].payload)
            state.frame_hint = result.offset
            offset += result.offset
            seq = result.next_seq
            continue
        offset += result.offset
        seq = result.next_seq
        if result.stop == Stop.LIMIT:
            break
        remaining_bytes -= sum(len(record.payload) for record in records[before:])
        if result.stop in (Stop.END, Stop.SHORT) and result.offset > 0:
            continue  # the read window ended; read on
        if result.stop == Stop.END and offset >= segment.end:
            continue
        raise QueueCorrupted(segment.path, offset, f"{result.stop} at seq {seq} inside "
                             "durable data (this segment should hold records up to seq "
                             f"{segment.last_seq})")
    if len(state.positions) > _MAX_POSITIONS:
        state.positions.clear()
    state.positions[seq] = (segment, offset)
    return records


def locate(state: SegmentState, seq: int) -> tuple[Segment, int]:
    """(segment, offset) of durable record ``seq``."""
    cached = state.positions.get(seq)
    if cached is not None and cached[0].handle is not None:
        return cached
    created = [s for s in state.segments if s.created]
    position = bisect.bisect_right([s.first_seq for s in created], seq) - 1
    segment = created[max(position, 0)]
    if seq > segment.last_seq:  # the end of this segment: the next begins with seq
        return segment, segment.end
    if seq <= segment.first_seq:
        return segment, SEGMENT_HEADER_BYTES
    ensure_scanned(state, segment)
    entry = bisect.bisect_right(segment.index_seqs, seq) - 1
    entry_seq, offset = segment.index_seqs[entry], segment.index_offsets[entry]
    if entry_seq == seq:
        return segment, offset
    data = state.io.pread(segment.handle, segment.end - offset, offset)
    result = parse_records(data, 0, len(data), entry_seq, None, max_records=seq - entry_seq)
    if result.stop != Stop.LIMIT:
        raise QueueCorrupted(segment.path, offset + result.offset,
                             f"{result.stop} at seq {result.next_seq}")
    return segment, offset + result.offset


def ensure_scanned(state: SegmentState, segment: Segment) -> None:
    """Check an older segment found at open and build its index (once).

    Its extent is known from the next segment's header (``end``, ``last_seq``); the
    records up to there must all be intact and in sequence.
    """
    if segment.scanned:
        return
    data = state.io.pread(segment.handle, segment.end, 0)
    result = index_records(segment, data, len(data))
    offset, seq = result.offset, result.next_seq
    if result.stop in (Stop.END, Stop.ZERO) and (offset != segment.end
                                                  or seq - 1 != segment.last_seq):
        raise QueueCorrupted(segment.path, offset, f"records end at seq {seq - 1}, but the "
                             f"next segment starts at seq {segment.last_seq + 1} and says "
                             f"this one ends at offset {segment.end}: records are missing")
    if result.stop != Stop.END:
        raise QueueCorrupted(segment.path, offset, f"{result.stop} at seq {seq}")
    segment.scanned = True


def bytes_from(state: SegmentState, seq: int) -> int:
    """On-disk bytes from durable record ``seq`` to the end of the durable records."""
    segment, offset = locate(state, seq)
    total = 0
    for current in state.segments[state.segments.index(segment):]:
        if not current.created:
            break
        start = offset if current is segment else SEGMENT_HEADER_BYTES
        total += max(current.end - start, 0)
    return total
