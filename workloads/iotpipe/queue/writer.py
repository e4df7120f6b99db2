"""Appends: placement of batches in segments, and the leader/follower group commit.

``place`` assigns seqs and a segment position under the state's ``cond`` and queues the
encoded chunk; ``commit`` makes one appender the leader, which writes every queued chunk
outside the lock (one write + one persist per segment) while the others wait for it.

A single-threaded owner (the middle tier's loop) may instead drive the group itself:
``append_nowait`` places a batch; ``start_write`` writes every placed batch as one group,
either on the calling thread or in the background on a ``SyncWorker`` thread that never
takes the GIL, while the owner prepares the next group; ``poll_durable`` settles a
background write that ended. Both paths place, frame and account for a group the same way;
they must not be mixed on one queue.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from .errors import QueueError, QueueFull
from .fileio import SyncWorker, sync_worker_for
from .framing import (
    RECORD_HEADER_BYTES,
    SEGMENT_HEADER_BYTES,
    clear_first_flag,
    encode_records,
    first_header_unflagged,
    framed_size,
)
from .segments import Segment, SegmentState

__all__ = ["ZERO_AHEAD_BYTES", "Writer"]

_log = logging.getLogger("iotpipe.queue")

# Zeros written ahead of the records in the fdatasync backend (see Writer.write).
ZERO_AHEAD_BYTES = 256 << 10
_ZEROS = bytes(ZERO_AHEAD_BYTES)


def _batch_length(payloads: Sequence[bytes]) -> int:
    """``len(payloads)``, or TypeError unless it is a sequence of payloads."""
    if isinstance(payloads, (bytes, bytearray, memoryview, str)):
        raise TypeError("append() takes a sequence of payloads, not one payload")
    try:
        return len(payloads)
    except TypeError:
        raise TypeError("append() takes a sequence of payloads (a list or tuple of bytes), "
                        f"got {type(payloads).__name__}") from None


class _Chunk:
    """Encoded records bound for one segment position; written by the group leader."""

    __slots__ = ("data", "first_seq", "last_seq", "offset", "segment")

    def __init__(self, segment: Segment, offset: int, data: bytes, first_seq: int,
                 last_seq: int) -> None:
        self.segment = segment
        self.offset = offset
        self.data = data
        self.first_seq = first_seq
        self.last_seq = last_seq


def _joined(chunks: list[_Chunk]) -> bytes:
    """Chunks bound for consecutive positions of one segment, as the bytes of one write."""
    if len(chunks) == 1:
        return chunks[0].data
    # Only the first record after a sync point may carry FIRST_IN_WRITE.
    return b"".join([chunks[0].data] + [clear_first_flag(chunk.data) for chunk in chunks[1:]])


def _zeros_ahead(segment: Segment, end: int) -> int:
    """How many zeros the fdatasync backend writes after a write that ends at ``end``."""
    if end > segment.zeroed_until and end < segment.size:
        # A write into preallocated (unwritten) extents makes its fdatasync also commit
        # the extent conversion to the journal. Writing zeros ahead of the records
        # converts ZERO_AHEAD_BYTES at once, so most syncs find their extents written.
        # The space past the tail is zeros already (fresh, or zeroed by recovery), so
        # no content changes.
        until = min(segment.size, end + ZERO_AHEAD_BYTES)
        segment.zeroed_until = until
        return until - end
    return 0


def _zero_ahead(segment: Segment, data: bytes, offset: int) -> bytes:
    """``data``, plus the zeros the fdatasync backend writes ahead of it when due."""
    zeros = _zeros_ahead(segment, offset + len(data))
    return data + _ZEROS[:zeros] if zeros else data


def _parts(chunks: list[_Chunk], segment: Segment) -> list[bytes | memoryview]:
    """``_joined(chunks)`` plus its zeros ahead, as parts of one vectored write: no copy."""
    parts: list[bytes | memoryview] = [chunks[0].data]
    for chunk in chunks[1:]:
        parts += (first_header_unflagged(chunk.data),
                  memoryview(chunk.data)[RECORD_HEADER_BYTES:])
    end = chunks[-1].offset + len(chunks[-1].data)
    zeros = _zeros_ahead(segment, end)
    if zeros:
        parts.append(memoryview(_ZEROS)[:zeros])
    return parts


class Writer:
    """The append side of one queue. ``reclaim`` (called with ``cond`` held) frees space."""

    def __init__(self, state: SegmentState, reclaim: Callable[[], None]) -> None:
        self._state = state
        self._reclaim = reclaim
        self._pending: list[_Chunk] = []
        self._flushing = False
        self._listeners: list[Callable[[int], None]] = []
        self._disk_reserve = 1 << 20  # keep this much free for the ledger and the system
        self._disk_full_logged = False
        # The pipelined path: the group in flight (on the worker, or written inline for the
        # rare shapes, with its outcome); None when no write is in flight.
        self._worker: SyncWorker | None = None
        self._inflight: list[_Chunk] | None = None
        self._inline_outcome: BaseException | bool | None = False  # False: on the worker

    def idle(self) -> bool:
        """No group is being written and none waits (or none ever will: the queue failed)."""
        return not self._flushing and (not self._pending or self._state.failed is not None)

    def add_listener(self, listener: Callable[[int], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[int], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # ------------------------------------------------------------------ append

    def append(self, payloads: Sequence[bytes], timeout: float) -> range:
        """``PersistentQueue.append``."""
        count = _batch_length(payloads)
        deadline = time.monotonic() + timeout
        state = self._state
        with state.cond:
            state.check_usable()
            self._check_not_pipelined()
            if not count:
                return range(state.next_seq, state.next_seq)
            while True:
                first = state.next_seq
                if self._place(payloads):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._full_error(payloads)
                state.cond.wait(remaining)
                state.check_usable()
            last = state.next_seq - 1
            self._commit(last)
        return range(first, last + 1)

    def append_batches(self, batches: Sequence[Sequence[bytes]]) -> list[range | Exception]:
        """``PersistentQueue.append_batches``."""
        results: list[range | Exception] = []
        valid: list[tuple[int, Sequence[bytes]]] = []  # (index in results, payloads)
        for payloads in batches:
            try:
                count = _batch_length(payloads)
            except TypeError as exc:
                results.append(exc)
                continue
            results.append(range(0))  # replaced below
            if count:
                valid.append((len(results) - 1, payloads))
        state = self._state
        with state.cond:
            state.check_usable()
            self._check_not_pipelined()
            for index, result in enumerate(results):
                if isinstance(result, range):
                    results[index] = range(state.next_seq, state.next_seq)
            placed: list[int] = []
            first = state.next_seq
            try:
                together = bool(valid) and self._place(
                    [payload for _, payloads in valid for payload in payloads])
            except (TypeError, ValueError):  # a bad batch somewhere: placed one by one below
                together = False
            if together:
                # The usual case: every batch fits, so the group is ONE encoded chunk.
                for index, payloads in valid:
                    results[index] = range(first, first + len(payloads))
                    first += len(payloads)
                    placed.append(index)
            else:
                for index, payloads in valid:
                    first = state.next_seq
                    try:
                        fits = self._place(payloads)
                    except (TypeError, ValueError) as exc:
                        results[index] = exc
                        continue
                    if fits:
                        results[index] = range(first, state.next_seq)
                        placed.append(index)
                    else:
                        results[index] = self._full_error(payloads)
            if placed:
                try:
                    self._commit(state.next_seq - 1)
                except QueueError as exc:
                    for index in placed:
                        results[index] = exc
        return results

    def _check_not_pipelined(self) -> None:
        if self._inflight is not None:
            raise RuntimeError("a blocking append while append_nowait's write is in flight: "
                               "a queue takes one kind of append")

    def _full_error(self, payloads: Sequence[bytes]) -> QueueFull:
        size = sum(framed_size(len(payload)) for payload in payloads)
        return QueueFull(f"queue {self._state.path} is full: {len(payloads)} records ({size} "
                         f"bytes) do not fit in capacity {self._state.capacity} bytes (or in "
                         "the free disk space) until consumers acknowledge more")

    # ------------------------------------------------------------------ placement

    def _place(self, payloads: Sequence[bytes]) -> bool:
        """Assign seqs and a segment position, encode, queue the chunk(s). False if full.

        Raises TypeError (a payload is not bytes-like) or ValueError (a record larger than a
        segment) with nothing changed.
        """
        state = self._state
        seq = state.next_seq
        data = encode_records(payloads, seq)  # checks every payload's type first
        segment, offset = state.segments[-1], state.tail_offset
        if len(data) > segment.size - offset:
            return self._place_across_segments(payloads)
        # The usual case: the batch fits in the last segment, one chunk, no new file.
        self._pending.append(_Chunk(segment, offset, data, seq, seq + len(payloads) - 1))
        state.tail_offset = offset + len(data)
        state.next_seq = seq + len(payloads)
        return True

    def _place_across_segments(self, payloads: Sequence[bytes]) -> bool:
        """``_place`` for a batch that needs one or more new segments (the rare path)."""
        state = self._state
        sizes = [framed_size(len(payload)) for payload in payloads]
        limit = state.segment_bytes - SEGMENT_HEADER_BYTES
        if max(sizes) > limit:
            size = next(len(p) for p in payloads if framed_size(len(p)) > limit)
            raise ValueError(f"record of {size} bytes does not fit in a segment "
                             f"({state.segment_bytes} bytes)")
        # Plan first (no side effects) so a batch that does not fit changes nothing.
        splits: list[tuple[int, int, int, bool]] = []  # (begin, end, offset, new segment)
        begin, offset, new = 0, state.tail_offset, False
        room = state.segments[-1].size - offset
        for index, size in enumerate(sizes):
            if size > room:
                if index > begin:
                    splits.append((begin, index, offset, new))
                begin, offset, new = index, SEGMENT_HEADER_BYTES, True
                room = state.segment_bytes - SEGMENT_HEADER_BYTES
            room -= size
        splits.append((begin, len(sizes), offset, new))
        new_bytes = sum(state.segment_bytes for split in splits if split[3])
        if state.allocated + new_bytes > state.capacity:
            self._reclaim()
            if state.allocated + new_bytes > state.capacity:
                return False
        if not self._disk_has_room(new_bytes):
            return False
        encoded: list[bytes] = []
        seq = state.next_seq
        for begin, end, _, _ in splits:
            encoded.append(encode_records(payloads[begin:end], seq))
            if len(encoded[-1]) != sum(sizes[begin:end]):  # len() was not the byte count
                raise TypeError("payloads must be bytes (or bytes-like with 1-byte items)")
            seq += end - begin
        seq = state.next_seq
        segment = state.segments[-1]
        for (begin, end, write_offset, new), data in zip(splits, encoded, strict=True):
            if new:
                previous, segment = segment, state.new_segment(seq)
                segment.previous = previous
            self._pending.append(_Chunk(segment, write_offset, data, seq, seq + end - begin - 1))
            seq += end - begin
            state.tail_offset = write_offset + len(data)
        state.next_seq = seq
        return True

    def _disk_has_room(self, new_bytes: int) -> bool:
        """A full disk is backpressure too: the segment could not be created (the error
        would poison the queue in the middle of a group commit)."""
        state = self._state
        if state.io.free_bytes(state.path) < new_bytes + self._disk_reserve:
            self._reclaim()
            if state.io.free_bytes(state.path) < new_bytes + self._disk_reserve:
                if not self._disk_full_logged:
                    _log.warning("queue %s: disk full (%d bytes free), refusing appends "
                                 "that need a new segment", state.path,
                                 state.io.free_bytes(state.path))
                    self._disk_full_logged = True
                return False
        self._disk_full_logged = False
        return True

    # ------------------------------------------------------------------ commit

    def _commit(self, last_seq: int) -> None:
        """Leader/follower: wait until ``last_seq`` is durable, writing groups as leader."""
        state = self._state
        cond = state.cond
        while state.durable_seq < last_seq:
            state.check_failed()
            if self._flushing:
                cond.wait()
                continue
            chunks, self._pending = self._pending, []
            self._flushing = True
            failure: BaseException | None = None
            cond.release()
            try:
                self._write_group(chunks)
            except BaseException as exc:
                failure = exc
            finally:
                cond.acquire()
                self._flushing = False
            self._settle(chunks, failure)

    def _settle(self, chunks: list[_Chunk], failure: BaseException | None) -> None:
        """A written group's outcome (``cond`` held): durable and readable, or the queue fails."""
        state = self._state
        if failure is not None:
            state.failed = failure
            state.cond.notify_all()
            raise QueueError(f"queue {state.path}: write failed ({failure!r}); "
                             "the batch is not durable, reopen the queue") from failure
        rolled = False
        for chunk in chunks:
            segment = chunk.segment
            segment.add_index(chunk.first_seq, chunk.offset)
            segment.end = chunk.offset + len(chunk.data)
            segment.last_seq = chunk.last_seq
            rolled = rolled or chunk.offset == SEGMENT_HEADER_BYTES
        state.durable_seq = chunks[-1].last_seq
        if rolled:
            self._reclaim()
        state.cond.notify_all()
        for listener in self._listeners:
            listener(state.durable_seq)

    def _write_group(self, chunks: list[_Chunk]) -> None:
        """Write and persist one group, one write per segment; runs outside the lock.

        A segment is persisted before the next one is created, so every segment but the
        last is fully synced (recovery relies on it).
        """
        index = 0
        written_end = 0  # where this group's records end in the previous segment
        while index < len(chunks):
            segment = chunks[index].segment
            stop = index + 1
            while stop < len(chunks) and chunks[stop].segment is segment:
                stop += 1
            if not segment.created:
                assert segment.previous is not None
                self._state.create_file(segment, written_end or segment.previous.end)
            data = _joined(chunks[index:stop])
            self.write_durably(segment, data, chunks[index].offset)
            written_end = chunks[index].offset + len(data)
            index = stop

    def write_durably(self, segment: Segment, data: bytes, offset: int) -> None:
        """Write ``data`` at ``offset`` of ``segment`` and persist it before returning."""
        if segment.mapping is not None:
            # pmem backend: pmem_memcpy_persist copies and persists in one call.
            segment.mapping.write_persist(data, offset)
            return
        # One call: the real file layer writes and syncs in one release of the GIL.
        self._state.io.write_synced(segment.handle, _zero_ahead(segment, data, offset), offset)

    # ------------------------------------------------------------------ pipelined appends

    def append_nowait(self, payloads: Sequence[bytes]) -> range:
        """``PersistentQueue.append_nowait``."""
        count = _batch_length(payloads)
        state = self._state
        with state.cond:
            state.check_usable()
            if self._flushing and self._inflight is None:
                raise RuntimeError("append_nowait while a blocking append is committing: "
                                   "a queue takes one kind of append")
            first = state.next_seq
            if count and not self._place(payloads):
                raise self._full_error(payloads)
            return range(first, state.next_seq)

    @property
    def writing(self) -> bool:
        """A background write is in flight (``poll_durable`` settles it once it ended)."""
        return self._inflight is not None

    def durable_fileno(self) -> int:
        """A descriptor that is readable once the write in flight finished."""
        return self._sync_worker().fileno()

    def poll_durable(self, wait: bool = False) -> int:
        """``PersistentQueue.poll_durable``."""
        state = self._state
        chunks = self._inflight
        if chunks is not None:
            outcome = self._inline_outcome
            if outcome is False:  # on the worker
                worker = self._sync_worker()
                if not wait and not worker.done():
                    with state.cond:
                        return state.durable_seq
                try:
                    worker.collect()
                    outcome = None
                except BaseException as exc:
                    outcome = exc
            with state.cond:
                self._inflight = None
                self._flushing = False
                self._settle(chunks, outcome if isinstance(outcome, BaseException) else None)
        with state.cond:
            return state.durable_seq

    def close_worker(self) -> None:
        """Finish the write in flight and write what was placed after it (their outcome
        settles the queue), stop the worker."""
        with contextlib.suppress(QueueError):
            if self._inflight is not None:
                self.poll_durable(wait=True)
            if self._pending and not self._flushing:  # placed by append_nowait, unwritten
                self.start_write(background=False)
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def _sync_worker(self) -> SyncWorker:
        if self._worker is None:
            self._worker = sync_worker_for(self._state.io)
        return self._worker

    def start_write(self, background: bool) -> bool:
        """``PersistentQueue.start_write``."""
        state = self._state
        with state.cond:
            state.check_usable()
            if self._inflight is not None or not self._pending:
                return False
            chunks, self._pending = self._pending, []
            self._inflight = chunks
            self._flushing = True
        segment = chunks[0].segment
        self._inline_outcome = None
        try:
            if (background and segment.created and segment.mapping is None
                    and all(chunk.segment is segment for chunk in chunks)):
                self._sync_worker().submit(segment.handle, _parts(chunks, segment),
                                           chunks[0].offset)
                self._inline_outcome = False
                return True
            # Here: asked to, or a shape the worker does not take (a new segment is created
            # and synced in order; pmem persists with a memcpy).
            self._write_group(chunks)
        except BaseException as exc:  # the group failed
            self._inline_outcome = exc
        # Written here (or failed): settled now, as no descriptor will signal it.
        self.poll_durable()
        return True
