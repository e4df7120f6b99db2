"""``PersistentQueue``: the segmented, group-committed, crash-safe queue (see package docs).

The queue composes its parts around one ``SegmentState``: ``recovery`` opens a directory,
``writer`` places and commits appends, ``reader`` reads by seq and ``cursors`` keeps the
consumers' cursors and reclaims what all of them acknowledged.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

from . import reader
from .cursors import Cursors, check_consumer_name
from .fileio import OS_FILE_IO, FileIO
from .framing import Record
from .recovery import recover
from .segments import MIN_SEGMENT_BYTES, SegmentState
from .writer import Writer

__all__ = ["Depth", "PersistentQueue"]


class Depth(NamedTuple):
    records: int
    bytes: int  # framed bytes on disk (16-byte headers and padding included)


class PersistentQueue:
    """A durable FIFO of opaque byte payloads with named consumers. Thread-safe.

    Open with :meth:`open`. ``append`` returns once the batch is durable; concurrent
    appenders share one write + sync (leader/follower group commit).
    """

    # The append side; a subclass may bring its own (the power-loss tests prove with a
    # writer that acknowledges before it syncs that they catch that bug).
    _writer_class: type[Writer] = Writer
    _state: SegmentState
    _cursors: Cursors
    _writer: Writer

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
            check_consumer_name(name)
        queue = cls(_token=_OPEN_TOKEN)
        state, cursors = recover(os.fspath(path), file_io or OS_FILE_IO, capacity_bytes,
                                 segment_bytes, persist, consumer_names)
        queue._state = state
        queue._cursors = cursors
        queue._writer = cls._writer_class(state, cursors.reclaim_locked)
        return queue

    def close(self) -> None:
        """Finish in-flight appends, then release files and the directory lock. Idempotent."""
        state = self._state
        self._writer.close_worker()
        with self._cursors.lock, state.cond:
            if state.closed:
                return
            state.cond.wait_for(self._writer.idle, timeout=60)
            state.closed = True
            state.cond.notify_all()
        self._cursors.close()
        state.release()

    def __enter__(self) -> PersistentQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> str:
        return self._state.path

    @property
    def capacity_bytes(self) -> int:
        return self._state.capacity

    @property
    def segment_bytes(self) -> int:
        return self._state.segment_bytes

    @property
    def persist_mode(self) -> str:
        return self._state.persist_mode

    @property
    def first_seq(self) -> int:
        with self._state.cond:
            return self._state.segments[0].first_seq

    @property
    def next_seq(self) -> int:
        with self._state.cond:
            return self._state.next_seq

    @property
    def durable_seq(self) -> int:
        """Last seq that is durable (readable)."""
        with self._state.cond:
            return self._state.durable_seq

    @property
    def consumers(self) -> list[str]:
        with self._state.cond:
            return sorted(self._cursors.acked_by)

    # ------------------------------------------------------------------ append

    def append(self, payloads: Sequence[bytes], *, timeout: float = 0.0) -> range:
        """Append ``payloads`` with consecutive seqs; return their range once all are durable.

        All or nothing: raises QueueFull if the whole batch does not fit within ``timeout``
        seconds (0 = do not wait), ValueError if one record is larger than a segment.
        """
        return self._writer.append(payloads, timeout)

    def append_batches(self, batches: Sequence[Sequence[bytes]]) -> list[range | Exception]:
        """Append several independent batches with ONE group commit (what a single writer
        thread calls once per group; ``AsyncQueue`` drives ``append_nowait`` instead).

        Each batch is all-or-nothing on its own; the result for each is its range or the
        exception it raised (QueueFull at once if it does not fit, TypeError, ValueError...).
        """
        return self._writer.append_batches(batches)

    # ------------------------------------------------------------------ pipelined appends

    def append_nowait(self, payloads: Sequence[bytes]) -> range:
        """Place ``payloads`` with consecutive seqs and return their range at once.

        ``start_write`` writes every placed batch as one group; they are durable (and
        readable) once ``poll_durable()`` returns at least the range's last seq. For one
        thread that owns the queue's appends (it must not also call ``append``). Raises
        like ``append``: QueueFull at once, ValueError, TypeError, QueueError once the
        queue failed.
        """
        return self._writer.append_nowait(payloads)

    def start_write(self, *, background: bool) -> bool:
        """Write and sync every placed batch as one group, unless a write is in flight;
        False when there was nothing to start.

        ``background=False`` returns once they are durable (the lowest latency when the
        caller has nothing else to do). ``background=True`` returns at once: a thread that
        never takes the GIL writes and syncs while the caller works (say, prepares the next
        group), and ``durable_fileno`` polls readable when it ended. A group that starts a
        new segment is written before returning either way (``writing`` is then False).
        Raises QueueError when a write made here failed.
        """
        return self._writer.start_write(background)

    @property
    def writing(self) -> bool:
        """A background write is in flight."""
        return self._writer.writing

    def poll_durable(self, *, wait: bool = False) -> int:
        """Settle the background write if it ended (``wait``: wait for it); return the
        durable seq. Raises QueueError if the write failed (the queue is then unusable)."""
        return self._writer.poll_durable(wait)

    def durable_fileno(self) -> int:
        """A descriptor that polls readable when a background write ended: then call
        ``poll_durable``."""
        return self._writer.durable_fileno()

    # ------------------------------------------------------------------ read side

    def wait(self, after_seq: int, timeout: float) -> bool:
        """Block until a record with seq > ``after_seq`` is durable; False on timeout."""
        state = self._state
        with state.cond:
            state.check_usable()
            ready = state.cond.wait_for(
                lambda: state.durable_seq > after_seq or state.closed or state.failed is not None,
                timeout=max(0.0, timeout))
            if ready and state.durable_seq > after_seq:
                return True
            state.check_usable()
            return False

    def read(self, from_seq: int, *, max_records: int = 1024,
             max_bytes: int = 4 << 20) -> list[Record]:
        """Durable records with seq >= ``from_seq``, in order (at least one if any exists)."""
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        with self._state.cond:
            self._state.check_usable()
            return reader.read(self._state, from_seq, max_records, max_bytes)

    # ------------------------------------------------------------------ consumers

    def register_consumer(self, name: str) -> None:
        """Register ``name`` (idempotent); a new consumer starts at the oldest retained record."""
        self._cursors.register(name)

    def unregister_consumer(self, name: str) -> None:
        """Forget ``name`` and its cursor (idempotent); may free segments."""
        self._cursors.unregister(name)

    def ack(self, consumer: str, seq: int) -> None:
        """Mark every record <= ``seq`` done for ``consumer``; durable on return."""
        self._cursors.ack(consumer, seq)

    def acked(self, consumer: str) -> int:
        return self._cursors.acked(consumer)

    def depth(self) -> Depth:
        """Records and on-disk bytes not yet acked by the slowest consumer (all if none)."""
        state = self._state
        with state.cond:
            state.check_usable()
            floor = self._cursors.slowest()
            records = state.durable_seq - floor
            if records <= 0:
                return Depth(0, 0)
            return Depth(records, reader.bytes_from(state, floor + 1))

    # ------------------------------------------------------------------ durability listeners

    def add_durable_listener(self, listener: Callable[[int], None]) -> None:
        """``listener(durable_seq)`` runs (under the queue lock, in the committing thread)
        after every group commit: keep it short and never call back into the queue."""
        with self._state.cond:
            self._writer.add_listener(listener)

    def remove_durable_listener(self, listener: Callable[[int], None]) -> None:
        with self._state.cond:
            self._writer.remove_listener(listener)


_OPEN_TOKEN = object()
