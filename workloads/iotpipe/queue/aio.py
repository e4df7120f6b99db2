"""``AsyncQueue``: the asyncio front of a ``PersistentQueue`` for servers, and the ONE
group-commit layer between a server and its queue.

Appends from many tasks or callbacks are collected while a write is in flight and handed
to ONE dedicated writer thread as a group: one write + one fdatasync for the whole group
(``PersistentQueue.append_batches``), and one ``call_soon_threadsafe`` to resolve every
future of it. The hand-off is a ``SimpleQueue`` put, not an executor submit (no future,
work item or lock per group on the event loop's side).

Two ways in:

- ``await append(payloads)``: an independent all-or-nothing batch with its own future and
  its own result (the seq range); several in one group still succeed or fail alone;
- ``submit(payloads, timeout)``: no coroutine; the payloads join the OPEN group's single
  batch and share its one future (the batch's seq range once durable). This is what ingest calls for
  every device frame: a group of hundreds of frames costs one future and one callback per
  waiting connection, not one per frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Sequence
from queue import SimpleQueue
from typing import Any

from .core import PersistentQueue
from .errors import QueueClosed, QueueFull

__all__ = ["AsyncQueue"]


class _Pending:
    __slots__ = ("deadline", "future", "payloads")

    def __init__(self, payloads: Sequence[bytes], future: asyncio.Future[Any],
                 deadline: float) -> None:
        self.payloads = payloads
        self.future = future
        self.deadline = deadline


class AsyncQueue:
    """Create inside a running event loop; ``aclose`` also closes the wrapped queue."""

    def __init__(self, queue: PersistentQueue) -> None:
        self._queue = queue
        self._loop = asyncio.get_running_loop()
        self._pending: list[_Pending] = []
        self._open: _Pending | None = None  # the submit() batch of the group not yet started
        self._writing = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._groups: SimpleQueue[list[_Pending] | None] = SimpleQueue()
        self._writer = threading.Thread(target=self._writer_main, name="iotpipe-queue",
                                        daemon=True)
        self._writer.start()
        self._waiters: list[tuple[int, asyncio.Future[bool]]] = []
        queue.add_durable_listener(self._on_durable_threadsafe)

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
        if not self._writing:
            self._start_group()
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
        if not self._writing:
            self._start_group()
        return entry.future

    def _start_group(self) -> None:
        group, self._pending = self._pending, []
        self._open = None
        self._writing = True
        self._idle.clear()
        self._groups.put(group)

    def _writer_main(self) -> None:
        """The writer thread: one group commit per group, then one hop back to the loop."""
        while True:
            group = self._groups.get()
            if group is None:
                return
            try:
                results: list[range | Exception] | Exception = self._queue.append_batches(
                    [item.payloads for item in group])
            except Exception as exc:
                results = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
                self._loop.call_soon_threadsafe(self._resolve, group, results)

    def _resolve(self, group: list[_Pending], results: list[range | Exception] | Exception
                 ) -> None:
        now = time.monotonic()
        for index, item in enumerate(group):
            result = results if isinstance(results, Exception) else results[index]
            if item.future.done():
                continue
            if isinstance(result, QueueFull) and item.deadline > now:
                # Waiting for space must not stall the group writer: wait in its own thread.
                call = functools.partial(self._queue.append, item.payloads,
                                         timeout=item.deadline - now)
                inner = self._loop.run_in_executor(None, call)
                inner.add_done_callback(functools.partial(_chain, item.future))
            elif isinstance(result, Exception):
                item.future.set_exception(result)
                # Marked retrieved: a submitter that left (a device gone) is not an error.
                item.future.exception()
            else:
                item.future.set_result(result)
        self._writing = False
        if self._pending:
            self._start_group()
        else:
            self._idle.set()

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
        if self._queue.durable_seq > after_seq:  # checked after registering: no lost wakeup
            future.set_result(True)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False
        finally:
            self._waiters = [w for w in self._waiters if w[1] is not future]

    def _on_durable_threadsafe(self, durable_seq: int) -> None:
        if self._waiters:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_durable, durable_seq)

    def _on_durable(self, durable_seq: int) -> None:
        for after_seq, future in self._waiters:
            if durable_seq > after_seq and not future.done():
                future.set_result(True)

    async def aclose(self) -> None:
        """Finish in-flight appends, then close the wrapped queue. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._idle.wait()
        self._queue.remove_durable_listener(self._on_durable_threadsafe)
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(QueueClosed("AsyncQueue is closed"))
        self._groups.put(None)
        await self._loop.run_in_executor(None, self._writer.join)
        await self._loop.run_in_executor(None, self._queue.close)


def _chain(target: asyncio.Future[Any], source: asyncio.Future[range]) -> None:
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
        target.exception()  # retrieved, as in _resolve
    else:
        target.set_result(source.result())
