"""The forwarder's I/O shell: moves the ingest queue's head to the middle tier.

It owns one DEALER socket per middle endpoint and drives a sans-I/O ``ForwarderCore``: it
reads durable records from the queue, sends windowed batches, and acks the queue (the
``forwarder`` consumer) only after the middle acked, so a crash at any point resends
rather than loses.

It runs on an asyncio event loop: ingest's own loop (``start(loop)``), so that ingest has
one Python thread and a batch costs no GIL hand-off between threads (a forwarder thread
spent most of its CPU waiting for the GIL: docs/benchmarks.md), or a loop of its own in a
thread (``start()``, for the queues a drain empties). The sockets' descriptors are readers
of the loop, the queue's durable listener schedules a send, deadlines are loop timers.
What may block on the disk never runs on a shared loop: the ledger's cursor write (an
fdatasync) and reads of a backlog (records far behind the head, or written before it
started, which may not be in the page cache) run in a thread of the forwarder's own;
records just made durable are read on the loop, from the page cache.

``set_endpoints`` (any thread) hands the forwarder a new endpoint list (a reloaded
endpoints file): it connects a socket to each added endpoint, lets the core renumber and
move the node if needed (resending what is unacked, in order), and only then closes the
sockets of removed endpoints. Nothing acked by a middle is resent needlessly and nothing
unacked is forgotten: the queue cursor moves only on acks, whatever the sockets do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq

from iotpipe.curve import CurveKeys, secure_client
from iotpipe.ingest.core.forwarder import ForwarderCore, Send
from iotpipe.queue import PersistentQueue, Record

__all__ = ["CONSUMER", "Forwarder"]

CONSUMER = "forwarder"
_NEVER = 1 << 62  # a seq no queue reaches
# Records further behind the durable head than this many batches are read off the loop:
# the last few groups' pages were just written and are in the page cache, a backlog's
# (after a middle outage, or at start) may not be.
_INLINE_READ_BATCHES = 32
log = logging.getLogger("iotpipe.ingest.forwarder")


class Forwarder:
    def __init__(
        self,
        queue: PersistentQueue,
        node: str,
        endpoints: Sequence[str],
        *,
        batch_records: int = 512,
        batch_bytes: int = 1 << 20,
        window: int = 8,
        ack_timeout: float = 5.0,
        linger: float = 0.002,
        cursor_interval: float = 0.05,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve_keys: CurveKeys | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("no middle endpoints given (--middle-endpoints)")
        self.queue = queue
        self.node = node
        self.endpoints = list(endpoints)
        self.batch_records = batch_records
        self.batch_bytes = batch_bytes
        self.linger = linger
        self.cursor_interval = cursor_interval
        self.curve_keys = curve_keys
        queue.register_consumer(CONSUMER)
        self.core = ForwarderCore(node, self.endpoints, next_seq=self._start_seq(),
                                  window=window, ack_timeout=ack_timeout)
        self._pending_endpoints: list[str] | None = None
        self._pending_lock = threading.Lock()
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._error: BaseException | None = None
        # Set by start():
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0          # ident of the thread that runs the loop
        self._thread: threading.Thread | None = None  # only with a loop of its own
        self._stop_requested: asyncio.Event | None = None
        self._inline_read_within = _NEVER
        self._inline_read_from = 0     # records written before start may be cold: not inline
        self._running = False
        self._closed = False
        self._sockets: list[zmq.Socket[bytes]] = []
        self._index_of: dict[zmq.Socket[bytes], int] = {}
        # The disk work that must not block a shared loop runs here, one job at a time.
        self._disk = concurrent.futures.ThreadPoolExecutor(1, f"forwarder-disk-{node}")
        self._reading = False                   # a backlog read is in the disk thread
        self._read_ahead: list[Record] = []     # its records, not sent yet
        self._cursor = queue.acked(CONSUMER)    # acked in the queue's ledger
        self._cursor_writing = False
        self._last_cursor_write = 0.0
        self._waiting_since: float | None = None  # when unsent records were first seen
        self._pump_due = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # The durable seq at which the queue's durable listener should schedule a send.
        self._wake_at = 0

    def _start_seq(self) -> int:
        return max(self.queue.acked(CONSUMER) + 1, self.queue.first_seq)

    # -- control ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> Forwarder:
        """Run on ``loop`` (call from the thread that runs it), or, without one, on a loop
        of its own in a new thread."""
        if self._loop is not None:
            raise RuntimeError("forwarder already started")
        if loop is not None:
            self._attach(loop, threading.get_ident(),
                         inline_within=_INLINE_READ_BATCHES * self.batch_records)
            return self
        own = asyncio.new_event_loop()
        self._stop_requested = asyncio.Event()
        started = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(own, started),
                                        name=f"forwarder-{self.node}", daemon=True)
        self._loop = own
        self._thread.start()
        started.wait()
        return self

    def _thread_main(self, loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        async def serve() -> None:
            try:
                # Its own thread may wait on the disk: every read inline, as it comes.
                self._attach(loop, threading.get_ident(), inline_within=_NEVER)
            except Exception:
                return  # logged, and surfaced through .error
            finally:
                started.set()
            assert self._stop_requested is not None
            await self._stop_requested.wait()
            await self.aclose()

        try:
            loop.run_until_complete(serve())
        finally:
            loop.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop from any thread but the loop's (there: ``await aclose()``)."""
        loop = self._loop
        if loop is None:
            if not self._closed:
                self._close_unstarted()
            return
        if self._thread is not None:
            if self._thread.is_alive():
                assert self._stop_requested is not None
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile
                    loop.call_soon_threadsafe(self._stop_requested.set)
            self._thread.join(timeout)
            return
        if self._closed:
            return
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("Forwarder.stop() on its own loop's thread: await aclose()")
        asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(timeout)

    def _close_unstarted(self) -> None:
        self._closed = True
        self._disk.shutdown(wait=False)
        if self._own_context:
            self._context.term()

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """Switch to a new endpoint list (any thread; applied on the forwarder's loop)."""
        new = list(dict.fromkeys(endpoints))
        if not new:
            raise ValueError("no middle endpoints given")
        with self._pending_lock:
            self._pending_endpoints = new
        loop = self._loop
        if loop is None or not self._running:
            return  # applied when it starts
        if threading.get_ident() == self._loop_thread:
            loop.call_soon(self._guarded, self._apply_pending)
        else:
            loop.call_soon_threadsafe(self._guarded, self._apply_pending)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def is_empty(self) -> bool:
        """Everything appended so far has been acked by a middle."""
        return self.queue.acked(CONSUMER) >= self.queue.next_seq - 1

    def wait_empty(self, timeout: float) -> bool:
        """Block (not on the forwarder's loop) until empty; False on timeout or failure."""
        deadline = time.monotonic() + timeout
        while not self.is_empty():
            if self._error is not None or not self._running:
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    async def aclose(self) -> None:
        """Stop on the forwarder's loop: the cursor owed is written, sockets closed."""
        if self._closed:
            return
        self._closed = True
        self._running = False
        self._detach()
        loop = asyncio.get_running_loop()
        final = self.core.acked_through
        try:
            # Queued behind the disk thread's jobs (a read or cursor write in flight), so
            # when it returns none of them touches the queue any more.
            if final > self._cursor and self._error is None:
                await loop.run_in_executor(self._disk, self.queue.ack, CONSUMER, final)
            else:
                await loop.run_in_executor(self._disk, _nothing)
        except Exception:
            log.exception("final forwarder cursor write failed",
                          extra={"fields": {"node": self.node}})
        self._disk.shutdown(wait=False)
        for sock in self._sockets:
            sock.close(0)
        self._sockets.clear()
        self._index_of.clear()
        if self._own_context:
            self._context.term()

    # -- on the loop -----------------------------------------------------------------

    def _attach(self, loop: asyncio.AbstractEventLoop, thread: int, inline_within: int) -> None:
        self._loop, self._loop_thread = loop, thread
        self._inline_read_within = inline_within
        self._inline_read_from = self.queue.durable_seq + 1 if inline_within < _NEVER else 0
        try:
            for endpoint in self.endpoints:
                sock = self._connect(endpoint)
                self._sockets.append(sock)
                self._watch(sock, len(self._sockets) - 1)
            self.queue.add_durable_listener(self._on_durable)
        except BaseException as exc:
            self._fail(exc)
            for sock in self._sockets:
                sock.close(0)
            self._sockets.clear()
            self._close_unstarted()
            raise
        self._running = True
        self._apply_pending()
        self._pump_soon()

    def _detach(self) -> None:
        self.queue.remove_durable_listener(self._on_durable)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for sock in self._sockets:
                loop.remove_reader(sock.FD)

    def _connect(self, endpoint: str) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.curve_keys is not None:
            secure_client(sock, self.curve_keys)
        sock.connect(endpoint)
        return sock

    def _watch(self, sock: zmq.Socket[bytes], index: int) -> None:
        assert self._loop is not None
        self._index_of[sock] = index
        self._loop.add_reader(sock.FD, self._guarded, self._on_readable, sock)

    def _guarded(self, callback: object, *args: object) -> None:
        """Run a loop callback; an error stops the forwarder (surfaced through ``error``
        and ingest's /readyz, which then exits the process)."""
        if self._closed or self._error is not None:
            return
        try:
            callback(*args)  # type: ignore[operator]
        except BaseException as exc:
            self._fail(exc)
            if not isinstance(exc, Exception):
                raise

    def _fail(self, exc: BaseException) -> None:
        self._error = exc
        self._running = False
        log.error("forwarder stopped", exc_info=exc, extra={"fields": {"node": self.node}})
        self._detach()

    def _on_durable(self, seq: int) -> None:
        # The queue's listener: in the committing thread, under the queue's lock.
        if seq >= self._wake_at and self._running:
            if threading.get_ident() == self._loop_thread:
                self._pump_soon()
            else:
                assert self._loop is not None
                # Never raise into the committing thread: a loop that just closed has
                # nothing left to send.
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._pump_soon)

    def _pump_soon(self) -> None:
        if not self._pump_due:
            self._pump_due = True
            assert self._loop is not None
            self._loop.call_soon(self._guarded, self._pump)

    def _apply_pending(self) -> None:
        with self._pending_lock:
            new, self._pending_endpoints = self._pending_endpoints, None
        if new is not None and new != self.endpoints:
            self._apply_endpoints(new)

    def _apply_endpoints(self, new: list[str]) -> None:
        """Renumber the sockets to ``new``: connect added, close removed."""
        assert self._loop is not None
        by_name = dict(zip(self.endpoints, self._sockets, strict=True))
        renumbered = [by_name.pop(name) if name in by_name else self._connect(name)
                      for name in new]
        self._sockets = renumbered
        for i, sock in enumerate(renumbered):
            if sock in self._index_of:
                self._index_of[sock] = i
            else:
                self._watch(sock, i)
        for send in self.core.set_endpoints(new, time.monotonic()):
            self._send(send)
        for sock in by_name.values():  # removed: nothing in flight refers to them now
            self._loop.remove_reader(sock.FD)
            del self._index_of[sock]
            sock.close(0)
        log.info("middle endpoints changed", extra={"fields": {
            "node": self.node, "endpoints": new, "endpoint": new[self.core.endpoint]}})
        self.endpoints = new
        self._pump_soon()

    def _on_readable(self, sock: zmq.Socket[bytes]) -> None:
        core = self.core
        index = self._index_of.get(sock)
        if index is None:
            return  # closed by an endpoint change after this callback was scheduled
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            core.on_reply(index, frames, time.monotonic())
        self._pump()

    def _send(self, send: Send) -> None:
        sock = self._sockets[send.endpoint]
        # Never block on a peer that is gone: an unsent batch times out and is resent.
        try:
            sock.send_multipart(send.frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("middle endpoint send queue full; will resend on timeout")
        # The descriptor is edge-triggered, and a send can take in a reply without it
        # firing: look now, or that reply waits for the next one.
        if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            assert self._loop is not None
            self._loop.call_soon(self._guarded, self._on_readable, sock)

    def _pump(self) -> None:
        """Send what the window allows, write the cursor when due, arm the next wake-up."""
        self._pump_due = False
        core, queue = self.core, self.queue
        now = time.monotonic()
        for send in core.poll(now):  # resends: after a busy pause, or a failover
            self._send(send)
        # Fill the window from the durable head of the queue. While batches are in flight,
        # a small batch waits up to `linger` for more records (fewer, fuller batches: less
        # per-batch work here, in the middle and in the ledger).
        while core.can_send(now) and (durable := queue.durable_seq) >= core.next_seq:
            if self._waiting_since is None:
                self._waiting_since = now
            if (not core.idle() and durable + 1 - core.next_seq < self.batch_records
                    and now - self._waiting_since < self.linger):
                break
            records = self._take_records(durable)
            if not records:
                break
            self._waiting_since = None
            self._send(core.add(records[0].seq, [r.payload for r in records], now))
        self._maybe_write_cursor(now)
        self._arm(now)

    def _take_records(self, durable: int) -> list[Record]:
        """The next batch: read ahead by the disk thread, read here if it is near the
        head, or [] while the disk thread reads it."""
        next_seq = self.core.next_seq
        ahead = self._read_ahead
        if ahead:
            self._read_ahead = []
            if ahead[0].seq == next_seq:
                return ahead
        if self._reading:
            return []
        if next_seq >= self._inline_read_from and durable - next_seq < self._inline_read_within:
            return self.queue.read(next_seq, max_records=self.batch_records,
                                   max_bytes=self.batch_bytes)
        self._reading = True
        assert self._loop is not None
        read = self._loop.run_in_executor(self._disk, functools.partial(
            self.queue.read, next_seq, max_records=self.batch_records,
            max_bytes=self.batch_bytes))
        read.add_done_callback(self._on_read)
        return []

    def _on_read(self, read: asyncio.Future[list[Record]]) -> None:
        self._reading = False
        if self._succeeded(read):
            self._read_ahead = read.result()
            self._guarded(self._pump)

    def _maybe_write_cursor(self, now: float) -> None:
        # The ledger write is an fdatasync: at most every `cursor_interval` (a drain waits
        # on it: at most that much longer). Losing a cursor update in a crash only means
        # resending batches the middle deduplicates.
        seq = self.core.acked_through
        if (self._cursor_writing or self._cursor >= seq
                or now - self._last_cursor_write < self.cursor_interval):
            return
        self._cursor_writing = True
        self._last_cursor_write = now
        assert self._loop is not None
        write = self._loop.run_in_executor(self._disk, self.queue.ack, CONSUMER, seq)
        write.add_done_callback(functools.partial(self._on_cursor_written, seq))

    def _on_cursor_written(self, seq: int, write: asyncio.Future[None]) -> None:
        self._cursor_writing = False
        if self._succeeded(write):
            self._cursor = seq
            self._guarded(self._pump)

    def _succeeded(self, job: asyncio.Future[Any]) -> bool:
        """Whether a disk thread's job succeeded; a failure stops the forwarder (once)."""
        if job.cancelled():
            return False
        exc = job.exception()
        if exc is None:
            return True
        if not self._closed and self._error is None:
            self._fail(exc)
        return False

    def _arm(self, now: float) -> None:
        """Schedule the next pump: a deadline (a resend, the cursor write owed, the end of
        a small batch's linger, a busy middle's pause), and say at which durable seq the
        queue's listener should call."""
        core, queue = self.core, self.queue
        wake = core.next_deadline()
        if self._cursor < core.acked_through and not self._cursor_writing:
            wake = _earliest(wake, self._last_cursor_write + self.cursor_interval)
        if (self._waiting_since is not None and core.can_send(now)
                and queue.durable_seq >= core.next_seq):
            wake = _earliest(wake, self._waiting_since + self.linger)
        # A pump per group commit only when it would send: at the first new record when
        # nothing is in flight; while batches are, at a full batch (a reply comes before
        # that anyway, and starts a smaller batch's linger); never while the window is
        # full. Set before durable_seq is read again, so a group that ends in between is
        # seen here or calls.
        if not core.can_send(now):
            self._wake_at = _NEVER
            if core.paused_until > now:
                wake = _earliest(wake, core.paused_until)
        elif core.idle():
            self._wake_at = core.next_seq
        else:
            self._wake_at = core.next_seq + self.batch_records - 1
        if queue.durable_seq >= self._wake_at and not self._reading:
            self._pump_soon()
        if wake is None:
            return
        timer = self._timer
        if timer is not None and not timer.cancelled() and self._timer_at <= wake:
            return  # an earlier (or the same) wake-up is armed; it re-arms
        if timer is not None:
            timer.cancel()
        assert self._loop is not None
        self._timer_at = wake
        # loop.time() and time.monotonic() are the same clock on Linux; convert anyway.
        self._timer = self._loop.call_at(self._loop.time() + max(0.0, wake - now),
                                         self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._guarded(self._pump)


def _nothing() -> None:
    pass


def _earliest(current: float | None, candidate: float) -> float:
    return candidate if current is None else min(current, candidate)
