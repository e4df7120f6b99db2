"""``PersistentQueue``: the segmented, group-committed, crash-safe queue (see package docs)."""

from __future__ import annotations

import bisect
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from . import pmem as pmem_binding
from .errors import QueueClosed, QueueCorrupted, QueueError, QueueFull, QueueLocked
from .fileio import OS_FILE_IO, FileIO
from .framing import (
    SEGMENT_HEADER_BYTES,
    Record,
    Stop,
    clear_first_flag,
    decode_segment_header,
    encode_records,
    encode_segment_header,
    find_later_write,
    framed_size,
    parse_records,
)
from .ledger import MAX_CONSUMER_NAME_BYTES, Ledger

__all__ = ["Depth", "PersistentQueue"]

_log = logging.getLogger("iotpipe.queue")

LOCK_NAME = "LOCK"
MIN_SEGMENT_BYTES = 4096
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
# Sparse in-memory index: one (seq, offset) entry at least every this many records/bytes.
# Zeros written ahead of the records in the fdatasync backend (see _write).
ZERO_AHEAD_BYTES = 256 << 10
_ZEROS = bytes(ZERO_AHEAD_BYTES)
_INDEX_RECORDS = 256
_INDEX_BYTES = 64 << 10
_PARSE_BATCH = 256


def _batch_length(payloads: Sequence[bytes]) -> int:
    """``len(payloads)``, or TypeError unless it is a sequence of payloads."""
    if isinstance(payloads, (bytes, bytearray, memoryview, str)):
        raise TypeError("append() takes a sequence of payloads, not one payload")
    try:
        return len(payloads)
    except TypeError:
        raise TypeError("append() takes a sequence of payloads (a list or tuple of bytes), "
                        f"got {type(payloads).__name__}") from None


class Depth(NamedTuple):
    records: int
    bytes: int  # framed bytes on disk (16-byte headers and padding included)


class _Segment:
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
        self.previous: _Segment | None = None  # set on segments created by appends
        self.zeroed_until = 0  # bytes below this were written (zeros or records) by us

    def add_index(self, seq: int, offset: int) -> None:
        if (
            not self.index_seqs
            or seq - self.index_seqs[-1] >= _INDEX_RECORDS
            or offset - self.index_offsets[-1] >= _INDEX_BYTES
        ):
            self.index_seqs.append(seq)
            self.index_offsets.append(offset)


class _Chunk:
    """Encoded records bound for one segment position; written by the group leader."""

    __slots__ = ("data", "first_seq", "last_seq", "offset", "segment")

    def __init__(self, segment: _Segment, offset: int, data: bytes, first_seq: int,
                 last_seq: int) -> None:
        self.segment = segment
        self.offset = offset
        self.data = data
        self.first_seq = first_seq
        self.last_seq = last_seq


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"


def _check_consumer_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"consumer name must be a non-empty string, got {name!r}")
    if len(name.encode()) > MAX_CONSUMER_NAME_BYTES:
        raise ValueError(f"consumer name longer than {MAX_CONSUMER_NAME_BYTES} bytes: {name!r}")


class PersistentQueue:
    """A durable FIFO of opaque byte payloads with named consumers. Thread-safe.

    Open with :meth:`open`. ``append`` returns once the batch is durable; concurrent
    appenders share one write + sync (leader/follower group commit).
    """

    def __init__(self, *, _token: object = None) -> None:
        if _token is not _OPEN_TOKEN:
            raise TypeError("use PersistentQueue.open(path, ...)")

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        capacity_bytes: int = 1 << 30,
        segment_bytes: int = 64 << 20,
        persist: str = "auto",
        consumers: Iterable[str] = (),
        file_io: FileIO | None = None,
    ) -> PersistentQueue:
        """Open (creating if missing) the queue in directory ``path`` and recover it.

        ``segment_bytes`` is capped to half of ``capacity_bytes`` (a queue always needs
        room for two segments to roll over) and rounded down to 4 KiB. ``file_io`` replaces
        the file-operation layer (tests simulate power loss with it).
        """
        if persist not in ("auto", "fdatasync", "pmem"):
            raise ValueError(f"persist must be 'auto', 'fdatasync' or 'pmem', got {persist!r}")
        if capacity_bytes < 2 * MIN_SEGMENT_BYTES:
            raise ValueError(f"capacity_bytes must be at least {2 * MIN_SEGMENT_BYTES}, "
                             f"got {capacity_bytes}")
        segment_bytes = min(segment_bytes, capacity_bytes // 2) // 4096 * 4096
        if segment_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be at least {MIN_SEGMENT_BYTES}")
        consumer_names = list(consumers)
        for name in consumer_names:
            _check_consumer_name(name)
        queue = cls(_token=_OPEN_TOKEN)
        queue._init(os.fspath(path), capacity_bytes, segment_bytes, persist,
                    file_io or OS_FILE_IO)
        try:
            queue._recover(consumer_names)
        except BaseException:
            queue._release_files()
            raise
        return queue

    def _init(self, path: str, capacity_bytes: int, segment_bytes: int, persist: str,
              file_io: FileIO) -> None:
        self._path = path
        self._io = file_io
        self._capacity = capacity_bytes
        self._segment_bytes = segment_bytes
        self._requested_persist = persist
        self._persist_mode = "fdatasync"
        self._cond = threading.Condition(threading.Lock())
        self._ledger_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._allocated = 0  # bytes of segment files, including ones reserved not yet created
        self._next_seq = 1
        self._durable_seq = 0
        self._tail_offset = SEGMENT_HEADER_BYTES  # reservation offset in the last segment
        self._pending: list[_Chunk] = []
        self._flushing = False
        self._failed: BaseException | None = None
        self._closed = False
        self._cursors: dict[str, int] = {}
        self._positions: dict[int, tuple[_Segment, int]] = {}
        self._listeners: list[Callable[[int], None]] = []
        self._lock_handle: Any = None
        self._ledger: Ledger | None = None
        self._disk_reserve = 1 << 20  # keep this much free for the ledger and the system
        self._disk_full_logged = False
        self._registering: int | None = None  # cursor of a consumer being registered

    def _recover(self, consumer_names: list[str]) -> None:
        io = self._io
        io.makedirs(self._path)
        lock_path = os.path.join(self._path, LOCK_NAME)
        try:
            self._lock_handle = io.lock(lock_path)
        except BlockingIOError:
            holder = ""
            try:
                with open(lock_path) as lock_file:
                    holder = lock_file.read().strip()
            except OSError:
                pass
            raise QueueLocked(
                f"queue {self._path} is already open (lock {lock_path} held"
                + (f" by pid {holder})" if holder else ")")
                + "; one process per queue directory"
            ) from None
        names = io.listdir(self._path)
        for name in names:
            if name.endswith(".tmp"):  # a segment or ledger creation that never completed
                io.unlink(os.path.join(self._path, name))
        self._ledger = Ledger(io, self._path)
        found = sorted(int(m.group(1)) for m in map(_SEGMENT_NAME.match, names) if m)
        for first_seq in found:
            segment_path = os.path.join(self._path, _segment_name(first_seq))
            handle = io.open(segment_path, create=False)
            size = io.size(handle)
            segment = _Segment(segment_path, first_seq, size)
            segment.handle = handle
            segment.created = True
            segment.scanned = False
            self._segments.append(segment)
            self._allocated += size
            try:
                header_seq, header_size, previous_end = decode_segment_header(
                    io.pread(handle, SEGMENT_HEADER_BYTES, 0))
            except ValueError as exc:
                raise QueueCorrupted(segment_path, 0, str(exc)) from None
            if header_seq != first_seq or header_size != size:
                raise QueueCorrupted(segment_path, 0, f"header says first seq {header_seq}, "
                                     f"{header_size} bytes; file is {size} bytes")
            if len(self._segments) >= 2:
                previous = self._segments[-2]
                if not SEGMENT_HEADER_BYTES <= previous_end <= previous.size:
                    raise QueueCorrupted(segment_path, 0, f"previous segment end {previous_end}"
                                         f" is outside {previous.path}")
                # Sealed and synced: its extent is known without a scan.
                previous.end, previous.last_seq = previous_end, first_seq - 1
        cursors = dict(self._ledger.cursors)
        if not self._segments:
            if any(acked > 0 for acked in cursors.values()):
                raise QueueCorrupted(self._path, 0, "no segment files, but the ledger has "
                                     f"acknowledged records: {cursors}")
            self._segments.append(self._new_segment(1))
            self._allocated += self._segment_bytes
            self._create_segment_file(self._segments[-1], previous_end=0)
        else:
            self._recover_tail(self._segments[-1])
        tail = self._segments[-1]
        self._next_seq = tail.last_seq + 1
        self._durable_seq = tail.last_seq
        self._tail_offset = tail.end
        first_seq = self._segments[0].first_seq
        for name, acked in cursors.items():
            if acked > self._durable_seq:
                raise QueueCorrupted(self._ledger.path, 0, f"consumer {name!r} acked seq {acked}"
                                     f" but the last record is {self._durable_seq}")
            if acked < first_seq - 1:
                raise QueueCorrupted(self._path, 0, f"records {acked + 1}..{first_seq - 1} not "
                                     f"yet acked by {name!r} are missing (segment files gone)")
        self._cursors = cursors
        new = [name for name in dict.fromkeys(consumer_names) if name not in cursors]
        if new:
            updated = dict(cursors)
            for name in new:
                updated[name] = first_seq - 1
            self._ledger.write(updated)
            self._cursors = updated
        self._choose_persist_mode()
        with self._cond:
            self._reclaim_locked()
        free = io.free_bytes(self._path)
        if free < self._capacity - self._allocated:
            _log.warning("queue %s: capacity %d bytes but only %d bytes free on disk; appends "
                         "will be refused as full before the capacity is reached",
                         self._path, self._capacity, free + self._allocated)

    def _recover_tail(self, segment: _Segment) -> None:
        """Scan the last segment, cut a torn tail, and fail on damage inside synced data."""
        io = self._io
        data = io.pread(segment.handle, segment.size, 0)
        offset, seq = SEGMENT_HEADER_BYTES, segment.first_seq
        while True:
            segment.add_index(seq, offset)
            result = parse_records(data, offset, segment.size, seq, None,
                                   max_records=_PARSE_BATCH)
            offset, seq = result.offset, result.next_seq
            if result.stop != Stop.LIMIT:
                break
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

    def _choose_persist_mode(self) -> None:
        requested = self._requested_persist
        if requested == "fdatasync":
            return
        if self._io is not OS_FILE_IO:
            if requested == "pmem":
                raise QueueError("persist='pmem' needs real files (a custom file_io was given)")
            return
        try:
            mapping = pmem_binding.PmemMapping(self._segments[-1].path)
        except (pmem_binding.PmemUnavailable, OSError) as exc:
            if requested == "pmem":
                raise QueueError(f"persist='pmem' but {exc}") from exc
            return
        if not mapping.is_pmem:
            mapping.close()
            if requested == "pmem":
                raise QueueError(
                    f"persist='pmem' but {self._path} is not on persistent memory "
                    "(pmem_is_pmem is false; use a DAX mount, or PMEM_IS_PMEM_FORCE=1 in tests)")
            return
        self._segments[-1].mapping = mapping
        self._persist_mode = "pmem"
        if os.environ.get("PMEM_IS_PMEM_FORCE") == "1":
            _log.warning("queue %s uses the pmem backend because PMEM_IS_PMEM_FORCE=1: on a "
                         "file that is not persistent memory, appends are NOT durable",
                         self._path)

    def close(self) -> None:
        """Finish in-flight appends, then release files and the directory lock. Idempotent."""
        with self._ledger_lock, self._cond:
            if self._closed:
                return
            self._cond.wait_for(lambda: not self._flushing and
                                (not self._pending or self._failed is not None), timeout=60)
            self._closed = True
            self._cond.notify_all()
        self._release_files()

    def _release_files(self) -> None:
        for segment in self._segments:
            if segment.mapping is not None:
                segment.mapping.close()
                segment.mapping = None
            if segment.handle is not None:
                self._io.close(segment.handle)
                segment.handle = None
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
        if self._lock_handle is not None:
            self._io.unlock(self._lock_handle)
            self._lock_handle = None
        self._closed = True

    def __enter__(self) -> PersistentQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> str:
        return self._path

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def segment_bytes(self) -> int:
        return self._segment_bytes

    @property
    def persist_mode(self) -> str:
        return self._persist_mode

    @property
    def first_seq(self) -> int:
        with self._cond:
            return self._segments[0].first_seq

    @property
    def next_seq(self) -> int:
        with self._cond:
            return self._next_seq

    @property
    def durable_seq(self) -> int:
        """Last seq that is durable (readable)."""
        with self._cond:
            return self._durable_seq

    @property
    def consumers(self) -> list[str]:
        with self._cond:
            return sorted(self._cursors)

    def _check_usable(self) -> None:
        if self._closed:
            raise QueueClosed(f"queue {self._path} is closed")
        if self._failed is not None:
            raise QueueError(f"queue {self._path} failed earlier ({self._failed!r}); "
                             "reopen it to recover") from self._failed

    # ------------------------------------------------------------------ append

    def append(self, payloads: Sequence[bytes], *, timeout: float = 0.0) -> range:
        """Append ``payloads`` with consecutive seqs; return their range once all are durable.

        All or nothing: raises QueueFull if the whole batch does not fit within ``timeout``
        seconds (0 = do not wait), ValueError if one record is larger than a segment.
        """
        count = _batch_length(payloads)
        deadline = time.monotonic() + timeout
        with self._cond:
            self._check_usable()
            if not count:
                return range(self._next_seq, self._next_seq)
            while True:
                first = self._next_seq
                if self._place(payloads):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._full_error(payloads)
                self._cond.wait(remaining)
                self._check_usable()
            last = self._next_seq - 1
            self._commit(last)
        return range(first, last + 1)

    def append_batches(self, batches: Sequence[Sequence[bytes]]) -> list[range | Exception]:
        """Append several independent batches with ONE group commit (what a single writer,
        such as ``AsyncQueue``'s writer thread, calls once per group).

        Each batch is all-or-nothing on its own; the result for each is its range or the
        exception it raised (QueueFull at once if it does not fit, TypeError, ValueError...).
        """
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
        with self._cond:
            self._check_usable()
            for index, result in enumerate(results):
                if isinstance(result, range):
                    results[index] = range(self._next_seq, self._next_seq)
            placed: list[int] = []
            first = self._next_seq
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
                    first = self._next_seq
                    try:
                        fits = self._place(payloads)
                    except (TypeError, ValueError) as exc:
                        results[index] = exc
                        continue
                    if fits:
                        results[index] = range(first, self._next_seq)
                        placed.append(index)
                    else:
                        results[index] = self._full_error(payloads)
            if placed:
                try:
                    self._commit(self._next_seq - 1)
                except QueueError as exc:
                    for index in placed:
                        results[index] = exc
        return results

    def _full_error(self, payloads: Sequence[bytes]) -> QueueFull:
        size = sum(framed_size(len(payload)) for payload in payloads)
        return QueueFull(f"queue {self._path} is full: {len(payloads)} records ({size} "
                         f"bytes) do not fit in capacity {self._capacity} bytes (or in the free "
                         "disk space) until consumers acknowledge more")

    def _place(self, payloads: Sequence[bytes]) -> bool:
        """Assign seqs and a segment position, encode, queue the chunk(s). False if full.

        Raises TypeError (a payload is not bytes-like) or ValueError (a record larger than a
        segment) with nothing changed.
        """
        seq = self._next_seq
        data = encode_records(payloads, seq)  # checks every payload's type first
        segment, offset = self._segments[-1], self._tail_offset
        if len(data) > segment.size - offset:
            return self._place_across_segments(payloads)
        # The usual case: the batch fits in the last segment, one chunk, no new file.
        self._pending.append(_Chunk(segment, offset, data, seq, seq + len(payloads) - 1))
        self._tail_offset = offset + len(data)
        self._next_seq = seq + len(payloads)
        return True

    def _place_across_segments(self, payloads: Sequence[bytes]) -> bool:
        """``_place`` for a batch that needs one or more new segments (the rare path)."""
        sizes = [framed_size(len(payload)) for payload in payloads]
        limit = self._segment_bytes - SEGMENT_HEADER_BYTES
        if max(sizes) > limit:
            size = next(len(p) for p in payloads if framed_size(len(p)) > limit)
            raise ValueError(f"record of {size} bytes does not fit in a segment "
                             f"({self._segment_bytes} bytes)")
        # Plan first (no side effects) so a batch that does not fit changes nothing.
        splits: list[tuple[int, int, int, bool]] = []  # (begin, end, offset, new segment)
        begin, offset, new = 0, self._tail_offset, False
        room = self._segments[-1].size - offset
        for index, size in enumerate(sizes):
            if size > room:
                if index > begin:
                    splits.append((begin, index, offset, new))
                begin, offset, new = index, SEGMENT_HEADER_BYTES, True
                room = self._segment_bytes - SEGMENT_HEADER_BYTES
            room -= size
        splits.append((begin, len(sizes), offset, new))
        new_bytes = sum(self._segment_bytes for split in splits if split[3])
        if self._allocated + new_bytes > self._capacity:
            self._reclaim_locked()
            if self._allocated + new_bytes > self._capacity:
                return False
        # A full disk is backpressure too: the segment could not be created (the error
        # would poison the queue in the middle of a group commit).
        if self._io.free_bytes(self._path) < new_bytes + self._disk_reserve:
            self._reclaim_locked()
            if self._io.free_bytes(self._path) < new_bytes + self._disk_reserve:
                if not self._disk_full_logged:
                    _log.warning("queue %s: disk full (%d bytes free), refusing appends "
                                 "that need a new segment", self._path,
                                 self._io.free_bytes(self._path))
                    self._disk_full_logged = True
                return False
        self._disk_full_logged = False
        encoded: list[bytes] = []
        seq = self._next_seq
        for begin, end, _, _ in splits:
            encoded.append(encode_records(payloads[begin:end], seq))
            if len(encoded[-1]) != sum(sizes[begin:end]):  # len() was not the byte count
                raise TypeError("payloads must be bytes (or bytes-like with 1-byte items)")
            seq += end - begin
        seq = self._next_seq
        segment = self._segments[-1]
        for (begin, end, write_offset, new), data in zip(splits, encoded, strict=True):
            if new:
                previous, segment = segment, self._new_segment(seq)
                segment.previous = previous
                self._segments.append(segment)
                self._allocated += segment.size
            self._pending.append(_Chunk(segment, write_offset, data, seq, seq + end - begin - 1))
            seq += end - begin
            self._tail_offset = write_offset + len(data)
        self._next_seq = seq
        return True

    def _new_segment(self, first_seq: int) -> _Segment:
        return _Segment(os.path.join(self._path, _segment_name(first_seq)), first_seq,
                        self._segment_bytes)

    def _commit(self, last_seq: int) -> None:
        """Leader/follower: wait until ``last_seq`` is durable, writing groups as leader."""
        while self._durable_seq < last_seq:
            self._check_failed()
            if self._flushing:
                self._cond.wait()
                continue
            chunks, self._pending = self._pending, []
            self._flushing = True
            failure: BaseException | None = None
            self._cond.release()
            try:
                self._write_group(chunks)
            except BaseException as exc:
                failure = exc
            finally:
                self._cond.acquire()
                self._flushing = False
            if failure is not None:
                self._failed = failure
                self._cond.notify_all()
                raise QueueError(f"queue {self._path}: write failed ({failure!r}); "
                                 "the batch is not durable, reopen the queue") from failure
            rolled = False
            for chunk in chunks:
                segment = chunk.segment
                segment.add_index(chunk.first_seq, chunk.offset)
                segment.end = chunk.offset + len(chunk.data)
                segment.last_seq = chunk.last_seq
                rolled = rolled or chunk.offset == SEGMENT_HEADER_BYTES
            self._durable_seq = chunks[-1].last_seq
            if rolled:
                self._reclaim_locked()
            self._cond.notify_all()
            for listener in self._listeners:
                listener(self._durable_seq)

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise QueueError(f"queue {self._path} failed earlier ({self._failed!r}); "
                             "reopen it to recover") from self._failed

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
                self._create_segment_file(segment, written_end or segment.previous.end)
            if stop - index == 1:
                data = chunks[index].data
            else:  # only the first record after a sync point may carry FIRST_IN_WRITE
                data = b"".join([chunks[index].data] +
                                [clear_first_flag(chunk.data) for chunk in chunks[index + 1:stop]])
            self._write(segment, data, chunks[index].offset)
            self._persist(segment)
            written_end = chunks[index].offset + len(data)
            index = stop

    def _write(self, segment: _Segment, data: bytes, offset: int) -> None:
        if segment.mapping is not None:
            # pmem backend: pmem_memcpy_persist copies and persists in one call.
            segment.mapping.write_persist(data, offset)
            return
        end = offset + len(data)
        if end > segment.zeroed_until and end < segment.size:
            # A write into preallocated (unwritten) extents makes its fdatasync also commit
            # the extent conversion to the journal: about a third of every sync on ext4
            # here. Writing zeros ahead of the records converts ZERO_AHEAD_BYTES at once,
            # so most syncs find their extents written. The space past the tail is zeros
            # already (fresh, or zeroed by recovery), so no content changes.
            until = min(segment.size, end + ZERO_AHEAD_BYTES)
            data = data + _ZEROS[:until - end]
            segment.zeroed_until = until
        self._io.pwrite(segment.handle, data, offset)

    def _persist(self, segment: _Segment) -> None:
        if segment.mapping is None:  # a pmem write was persisted as it was copied
            self._io.fdatasync(segment.handle)

    def _create_segment_file(self, segment: _Segment, previous_end: int) -> None:
        """Create a preallocated segment as a temp file, sync it, rename it, sync the dir."""
        io = self._io
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
            io.sync_dir(self._path)
        except BaseException:
            io.close(handle)
            raise
        segment.handle = handle
        if self._persist_mode == "pmem":
            segment.mapping = pmem_binding.PmemMapping(segment.path)
            previous = segment.previous
            mapping = previous.mapping if previous is not None else None
            if mapping is not None:  # sealed and persisted: reads go through pread
                mapping.close()
                previous.mapping = None  # type: ignore[union-attr]
        segment.created = True

    # ------------------------------------------------------------------ reclaim

    def _reclaim_locked(self) -> None:
        """Delete sealed segments every registered consumer has acknowledged entirely."""
        if not self._cursors:
            return
        floor = min(self._cursors.values())
        if self._registering is not None:
            floor = min(floor, self._registering)
        freed = False
        while (len(self._segments) >= 2 and self._segments[1].created
               and self._segments[1].first_seq <= floor + 1):
            segment = self._segments.pop(0)
            self._allocated -= segment.size
            mapping = segment.mapping
            if mapping is not None:  # the writer may close it at the same time: idempotent
                mapping.close()
                segment.mapping = None
            self._io.close(segment.handle)
            segment.handle = None
            self._io.unlink(segment.path)
            freed = True
        if freed:
            self._positions = {seq: pos for seq, pos in self._positions.items()
                               if pos[0].handle is not None}
            self._cond.notify_all()

    # ------------------------------------------------------------------ read side

    def wait(self, after_seq: int, timeout: float) -> bool:
        """Block until a record with seq > ``after_seq`` is durable; False on timeout."""
        with self._cond:
            self._check_usable()
            ready = self._cond.wait_for(
                lambda: self._durable_seq > after_seq or self._closed or self._failed is not None,
                timeout=max(0.0, timeout))
            if ready and self._durable_seq > after_seq:
                return True
            self._check_usable()
            return False

    def read(self, from_seq: int, *, max_records: int = 1024,
             max_bytes: int = 4 << 20) -> list[Record]:
        """Durable records with seq >= ``from_seq``, in order (at least one if any exists)."""
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        with self._cond:
            self._check_usable()
            start = max(from_seq, self._segments[0].first_seq)
            if start > self._durable_seq:
                return []
            segment, offset = self._locate(start)
            records: list[Record] = []
            seq = start
            remaining_bytes = max_bytes
            while seq <= self._durable_seq and len(records) < max_records:
                if offset >= segment.end:
                    segment = self._segment_after(segment, seq)
                    offset = SEGMENT_HEADER_BYTES
                    continue
                before = len(records)
                want = min(segment.end - offset, max(remaining_bytes, 0) + (64 << 10), 1 << 20)
                data = self._io.pread(segment.handle, want, offset)
                result = parse_records(data, 0, len(data), seq, records,
                                       max_records=max_records - before,
                                       max_bytes=remaining_bytes, at_least_one=before == 0)
                if result.stop == Stop.SHORT and result.offset == 0:
                    # One record larger than the read window: read exactly that frame.
                    if before and result.frame_length - 16 > remaining_bytes:
                        break
                    if result.frame_length > segment.end - offset:
                        raise QueueCorrupted(segment.path, offset, f"record at seq {seq} runs "
                                             "past the end of the durable data")
                    data = self._io.pread(segment.handle, result.frame_length, offset)
                    result = parse_records(data, 0, len(data), seq, records, max_records=1)
                    if result.stop != Stop.LIMIT:
                        raise QueueCorrupted(segment.path, offset, f"{result.stop} at seq {seq} "
                                             "inside durable data")
                    remaining_bytes -= len(records[-1].payload)
                    offset += result.offset
                    seq = result.next_seq
                    continue
                remaining_bytes -= sum(len(record.payload) for record in records[before:])
                offset += result.offset
                seq = result.next_seq
                if result.stop == Stop.LIMIT:
                    break
                if result.stop in (Stop.END, Stop.SHORT) and result.offset > 0:
                    continue  # the read window ended; read on
                if result.stop == Stop.END and offset >= segment.end:
                    continue
                raise QueueCorrupted(segment.path, offset, f"{result.stop} at seq {seq} inside "
                                     "durable data (this segment should hold records up to seq "
                                     f"{segment.last_seq})")
            if len(self._positions) > 64:
                self._positions.clear()
            self._positions[seq] = (segment, offset)
            return records

    def _segment_after(self, segment: _Segment, seq: int) -> _Segment:
        """The segment after ``segment``, which must start with ``seq``."""
        following = self._segments[self._segments.index(segment) + 1]
        if following.first_seq != seq:
            raise QueueCorrupted(segment.path, segment.end, f"records end at seq {seq - 1}, but "
                                 f"the next segment starts at seq {following.first_seq}: "
                                 "records are missing")
        return following

    def _locate(self, seq: int) -> tuple[_Segment, int]:
        """(segment, offset) of durable record ``seq``; holds the lock."""
        cached = self._positions.get(seq)
        if cached is not None and cached[0].handle is not None:
            return cached
        created = [s for s in self._segments if s.created]
        position = bisect.bisect_right([s.first_seq for s in created], seq) - 1
        segment = created[max(position, 0)]
        if seq > segment.last_seq:  # the end of this segment: the next begins with seq
            return segment, segment.end
        if seq <= segment.first_seq:
            return segment, SEGMENT_HEADER_BYTES
        self._ensure_scanned(segment)
        entry = bisect.bisect_right(segment.index_seqs, seq) - 1
        entry_seq, offset = segment.index_seqs[entry], segment.index_offsets[entry]
        if entry_seq == seq:
            return segment, offset
        data = self._io.pread(segment.handle, segment.end - offset, offset)
        result = parse_records(data, 0, len(data), entry_seq, None, max_records=seq - entry_seq)
        if result.stop != Stop.LIMIT:
            raise QueueCorrupted(segment.path, offset + result.offset,
                                 f"{result.stop} at seq {result.next_seq}")
        return segment, offset + result.offset

    def _ensure_scanned(self, segment: _Segment) -> None:
        """Check an older segment found at open and build its index (once).

        Its extent is known from the next segment's header (``end``, ``last_seq``); the
        records up to there must all be intact and in sequence.
        """
        if segment.scanned:
            return
        data = self._io.pread(segment.handle, segment.end, 0)
        offset, seq = SEGMENT_HEADER_BYTES, segment.first_seq
        while True:
            segment.add_index(seq, offset)
            result = parse_records(data, offset, len(data), seq, None, max_records=_PARSE_BATCH)
            offset, seq = result.offset, result.next_seq
            if result.stop != Stop.LIMIT:
                break
        if result.stop in (Stop.END, Stop.ZERO) and (offset != segment.end
                                                      or seq - 1 != segment.last_seq):
            raise QueueCorrupted(segment.path, offset, f"records end at seq {seq - 1}, but the "
                                 f"next segment starts at seq {segment.last_seq + 1} and says "
                                 f"this one ends at offset {segment.end}: records are missing")
        if result.stop != Stop.END:
            raise QueueCorrupted(segment.path, offset, f"{result.stop} at seq {seq}")
        segment.scanned = True

    # ------------------------------------------------------------------ consumers

    def register_consumer(self, name: str) -> None:
        """Register ``name`` (idempotent); a new consumer starts at the oldest retained record."""
        _check_consumer_name(name)
        with self._ledger_lock:
            with self._cond:
                self._check_usable()
                if name in self._cursors:
                    return
                updated = dict(self._cursors)
                updated[name] = self._segments[0].first_seq - 1
                # Until the ledger has it, reclaim must not pass the new consumer's cursor.
                self._registering = updated[name]
            try:
                self._write_ledger(updated)
            finally:
                with self._cond:
                    self._registering = None

    def unregister_consumer(self, name: str) -> None:
        """Forget ``name`` and its cursor (idempotent); may free segments."""
        with self._ledger_lock:
            with self._cond:
                self._check_usable()
                if name not in self._cursors:
                    return
                updated = {k: v for k, v in self._cursors.items() if k != name}
            self._write_ledger(updated)

    def ack(self, consumer: str, seq: int) -> None:
        """Mark every record <= ``seq`` done for ``consumer``; durable on return."""
        with self._ledger_lock:
            with self._cond:
                self._check_usable()
                if consumer not in self._cursors:
                    raise KeyError(f"unknown consumer {consumer!r} (register it first)")
                if seq > self._durable_seq:
                    raise ValueError(f"cannot ack seq {seq}: the last durable record is "
                                     f"{self._durable_seq}")
                if seq <= self._cursors[consumer]:
                    return  # cumulative: an older ack is already covered
                updated = dict(self._cursors)
                updated[consumer] = seq
            self._write_ledger(updated)

    def _write_ledger(self, updated: dict[str, int]) -> None:
        assert self._ledger is not None
        try:
            self._ledger.write(updated)
        except OSError as exc:
            with self._cond:
                self._failed = exc
                self._cond.notify_all()
            raise QueueError(f"queue {self._path}: ledger write failed ({exc!r})") from exc
        with self._cond:
            self._cursors = updated
            self._reclaim_locked()

    def acked(self, consumer: str) -> int:
        with self._cond:
            if consumer not in self._cursors:
                raise KeyError(f"unknown consumer {consumer!r}")
            return self._cursors[consumer]

    def depth(self) -> Depth:
        """Records and on-disk bytes not yet acked by the slowest consumer (all if none)."""
        with self._cond:
            self._check_usable()
            first = self._segments[0].first_seq
            floor = min(self._cursors.values()) if self._cursors else first - 1
            floor = max(floor, first - 1)
            records = self._durable_seq - floor
            if records <= 0:
                return Depth(0, 0)
            segment, offset = self._locate(floor + 1)
            total = 0
            for current in self._segments[self._segments.index(segment):]:
                if not current.created:
                    break
                start = offset if current is segment else SEGMENT_HEADER_BYTES
                total += max(current.end - start, 0)
            return Depth(records, total)

    # ------------------------------------------------------------------ durability listeners

    def add_durable_listener(self, listener: Callable[[int], None]) -> None:
        """``listener(durable_seq)`` runs (under the queue lock, in the committing thread)
        after every group commit: keep it short and never call back into the queue."""
        with self._cond:
            self._listeners.append(listener)

    def remove_durable_listener(self, listener: Callable[[int], None]) -> None:
        with self._cond:
            if listener in self._listeners:
                self._listeners.remove(listener)


_OPEN_TOKEN = object()
