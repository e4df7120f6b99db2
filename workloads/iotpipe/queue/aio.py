"""``AsyncQueue``: the asyncio front of a ``PersistentQueue`` for servers, and the ONE
group-commit layer between a server and its queue.

Appends from many tasks or callbacks are collected while a write is in flight; when it
ends, the event loop places them as the next group (``append_nowait``: seqs, framing and
CRC in C) and starts its write on the queue's ``SyncWorker``, a C thread that writes and
fdatasyncs without ever taking the GIL. The worker's eventfd is a reader of the loop, so a
group costs the loop one wake-up and no thread a GIL hand-off (a Python writer thread took
the GIL two or three times a group and made the loop wait for it: docs/benchmarks.md).

Two ways in:

- ``await append(payloads)``: an independent all-or-nothing batch with its own future and
  its own result (the seq range); several in one group still succeed or fail alone;
- ``submit(payloads, timeout)``: no coroutine; the payloads join the OPEN group's single
  batch and share its one future (the batch's seq range once durable). This is what ingest calls for
  every device frame: a group of hundreds of frames costs one future and one callback per
  waiting connection, not one per frame.

A batch that does not fit waits for space until its deadline, placed again every few
milliseconds (space is freed by consumers' acks on other threads, which do not signal the
loop); the groups after it are not held back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from .core import PersistentQueue
from .errors import QueueClosed, QueueError, QueueFull

__all__ = ["AsyncQueue"]

# How often a batch waiting for space is placed again.
FULL_RETRY_S = 0.005


class _Pending:
    __slots__ = ("deadline", "future", "payloads")

    def __init__(self, payloads: Sequence[bytes], future: asyncio.Future[Any],
                 deadline: float) -> None:
        self.payloads = payloads
        self.future = future
        self.deadline = deadline


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        # Marked retrieved: a submitter that left (a device gone) is not an error.
        future.exception()


class AsyncQueue:
    """Create inside a running event loop, which then owns the queue's appends (nothing
    else may append to it); ``aclose`` also closes the wrapped queue."""

    def __init__(self, queue: PersistentQueue) -> None:
        self._queue = queue
        self._loop = asyncio.get_running_loop()
        self._pending: list[_Pending] = []  # for the next group
        self._open: _Pending | None = None  # the submit() batch of the next group
        self._written: list[tuple[_Pending, range]] = []  # placed in the group in flight
        self._writing = False
        self._start_due = False  # a _start_soon callback is scheduled
        self._full: list[_Pending] = []  # waiting for space until their deadline
        self._retry: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._waiters: list[tuple[int, asyncio.Future[bool]]] = []
        self._durable_fd = queue.durable_fileno()
        self._loop.add_reader(self._durable_fd, self._on_write_ended)

    @property
    def queue(self) -> PersistentQueue:
        return self._queue

    async def append(
        self,
        payloads: Sequence[bytes],
        timeout: float = 0.0,  # noqa: ASYNC109 - the contract mirrors PersistentQueue.append
    ) -> range:
        """Like ``PersistentQueue.append``; concurrent callers share one write + sync."""
        if self._closed:
            raise QueueClosed("AsyncQueue is closed")
        future: asyncio.Future[range] = self._loop.create_future()
        self._pending.append(_Pending(payloads, future, time.monotonic() + timeout))
        self._start_soon()
        return await future

    def submit(self, payloads: list[bytes], timeout: float = 0.0) -> asyncio.Future[range]:
        """Join the open group's one batch; its future is done once the batch is durable,
        or fails (``QueueFull`` after waiting up to ``timeout`` seconds from the group's
        first submit for space, ``QueueError``...) for every submitter of the group."""
        if self._closed:
            raise QueueClosed("AsyncQueue is closed")
        entry = self._open
        if entry is None:
            future: asyncio.Future[range] = self._loop.create_future()
            entry = self._open = _Pending(list(payloads), future,
                                          time.monotonic() + timeout)
            self._pending.append(entry)
        else:
            entry.payloads.extend(payloads)  # type: ignore[attr-defined]
        self._start_soon()
        return entry.future

    # -- the group commit ------------------------------------------------------------

    def _start_soon(self) -> None:
        """Start a group at the end of this loop turn, unless one is being written (its end
        starts the next): every batch of the turn (the frames of one read, of several
        connections) joins one group."""
        if not self._writing and not self._start_due:
            self._start_due = True
            self._idle.clear()
            self._loop.call_soon(self._start_due_group)

    def _start_due_group(self) -> None:
        self._start_due = False
        if not self._writing and self._pending:
            self._start_group()

    def _start_group(self) -> None:
        """Place what waits as one group and start its write in the background."""
        group, self._pending = self._pending, []
        self._open = None
        now = time.monotonic()
        placed: list[tuple[_Pending, range]] = []
        for item in group:
            if item.future.done():  # an append() whose caller was cancelled
                continue
            try:
                placed.append((item, self._queue.append_nowait(item.payloads)))
            except QueueFull as exc:
                if self._closed:  # no more waiting for space
                    _fail(item.future, QueueClosed("AsyncQueue is closed"))
                elif item.deadline > now:
                    self._full.append(item)
                else:
                    _fail(item.future, exc)
            except (QueueError, TypeError, ValueError) as exc:
                _fail(item.future, exc)
        if self._full and self._retry is None:
            self._retry = self._loop.call_later(FULL_RETRY_S, self._retry_full)
        self._written = placed
        self._writing = True  # _idle is clear already: a group was due or in flight
        try:
            self._queue.start_write(background=True)
        except QueueError as exc:  # written here (a new segment) and failed
            self._end_group(exc)
            return
        if not self._queue.writing:  # written here, or nothing to write: settled already
            self._end_group(None)

    def _on_write_ended(self) -> None:
        """The worker's descriptor is readable: settle the group it wrote."""
        if not self._queue.writing:
            return
        try:
            self._queue.poll_durable()
        except QueueError as exc:
            self._end_group(exc)
            return
        if not self._queue.writing:
            self._end_group(None)

    def _end_group(self, error: QueueError | None) -> None:
        written, self._written = self._written, []
        for item, seqs in written:
            if error is not None:
                _fail(item.future, error)
            elif not item.future.done():
                item.future.set_result(seqs)
        self._writing = False
        if self._waiters:
            durable = self._queue.durable_seq
            for after_seq, future in self._waiters:
                if durable > after_seq and not future.done():
                    future.set_result(True)
        if self._pending:
            self._start_group()
        elif not self._full:
            self._idle.set()

    def _retry_full(self) -> None:
        """Place the batches waiting for space again, ahead of newer ones."""
        self._retry = None
        self._pending[:0] = self._full
        self._full = []
        self._start_soon()  # or, if a group is in flight, its end starts them

    # -- waiting -----------------------------------------------------------------------

    async def wait_idle(self, within: float) -> bool:
        """True once no group is being written or waiting (within ``within`` seconds)."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.01, within))
        except TimeoutError:
            return False
        return True

    async def wait(self, after_seq: int, timeout: float) -> bool:  # noqa: ASYNC109
        """True once a record with seq > ``after_seq`` is durable; False after ``timeout``."""
        if self._closed:
            raise QueueClosed("AsyncQueue is closed")
        future: asyncio.Future[bool] = self._loop.create_future()
        self._waiters.append((after_seq, future))
        if self._queue.durable_seq > after_seq:
            future.set_result(True)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters = [w for w in self._waiters if w[1] is not future]

    async def aclose(self) -> None:
        """Finish the group in flight and what waits for it, fail what waits for space,
        then close the wrapped queue. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        closed = QueueClosed("AsyncQueue is closed")
        for item in self._full:
            _fail(item.future, closed)
        self._full = []
        if not self._writing and not self._pending:
            self._idle.set()
        await self._idle.wait()
        self._loop.remove_reader(self._durable_fd)
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(QueueClosed("AsyncQueue is closed"))
        await self._loop.run_in_executor(None, self._queue.close)
