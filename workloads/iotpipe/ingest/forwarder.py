"""The forwarder's I/O shell: a thread that moves the ingest queue's head to the middle tier.

One thread per queue owns one DEALER socket per middle endpoint (pyzmq sockets are not
thread-safe, so nothing else touches them) and drives a sans-I/O ``ForwarderCore``. It
reads durable records from the queue, sends windowed batches, and acks the queue (the
``forwarder`` consumer) only after the middle acked, so a crash at any point resends
rather than loses. A thread, not an asyncio task: the queue's read/ack block on disk and
the device-facing event loop must not.

``set_endpoints`` (any thread) hands the thread a new endpoint list (a reloaded endpoints
file): the thread connects a socket to each added endpoint, lets the core renumber and
move the node if needed (resending what is unacked, in order), and only then closes the
sockets of removed endpoints. Nothing acked by a middle is resent needlessly and nothing
unacked is forgotten: the queue cursor moves only on acks, whatever the sockets do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq

from iotpipe.curve import CurveKeys, secure_client
from iotpipe.ingest.core.forwarder import ForwarderCore
from iotpipe.queue import PersistentQueue, signal_eventfd

__all__ = ["CONSUMER", "Forwarder"]

CONSUMER = "forwarder"
_NEVER = 1 << 62  # a seq no queue reaches
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
        # The durable seq at which the thread wants the durable listener to wake it.
        self._wake_at = 0
        self._own_context = context is None
        self._context = context or zmq.Context()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"forwarder-{node}", daemon=True)

    def _start_seq(self) -> int:
        return max(self.queue.acked(CONSUMER) + 1, self.queue.first_seq)

    # -- control ---------------------------------------------------------------------

    def start(self) -> Forwarder:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """Switch to a new endpoint list (applied by the forwarder thread within ~50 ms)."""
        new = list(dict.fromkeys(endpoints))
        if not new:
            raise ValueError("no middle endpoints given")
        with self._pending_lock:
            self._pending_endpoints = new

    @property
    def error(self) -> BaseException | None:
        return self._error

    def is_empty(self) -> bool:
        """Everything appended so far has been acked by a middle."""
        return self.queue.acked(CONSUMER) >= self.queue.next_seq - 1

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_empty():
            if self._error is not None or not self._thread.is_alive():
                return False
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # -- the thread ------------------------------------------------------------------

    def _connect(self, endpoint: str) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.curve_keys is not None:
            secure_client(sock, self.curve_keys)
        sock.connect(endpoint)
        return sock

    def _run(self) -> None:
        sockets: list[zmq.Socket[bytes]] = []
        try:
            for endpoint in self.endpoints:
                sockets.append(self._connect(endpoint))
            self._loop(sockets)
        except BaseException as exc:  # surfaced through .error and /readyz
            self._error = exc
            log.exception("forwarder stopped", extra={"fields": {"node": self.node}})
        finally:
            for sock in sockets:
                sock.close(0)
            if self._own_context:
                self._context.term()

    def _take_pending(self) -> list[str] | None:
        with self._pending_lock:
            new, self._pending_endpoints = self._pending_endpoints, None
        return None if new == self.endpoints else new

    def _apply_endpoints(self, new: list[str], sockets: list[zmq.Socket[bytes]],
                         poller: zmq.Poller, index_of: dict[Any, int]) -> None:
        """Renumber ``sockets`` (in place) to ``new``: connect added, close removed."""
        by_name = dict(zip(self.endpoints, sockets, strict=True))
        renumbered = [by_name.pop(name) if name in by_name else self._connect(name)
                      for name in new]
        for i, sock in enumerate(renumbered):
            if sock not in index_of:
                poller.register(sock, zmq.POLLIN)
            index_of[sock] = i
        for send in self.core.set_endpoints(new, time.monotonic()):
            _send(renumbered[send.endpoint], send.frames)
        for sock in by_name.values():  # removed: nothing in flight refers to them now
            poller.unregister(sock)
            del index_of[sock]
            sock.close(0)
        log.info("middle endpoints changed", extra={"fields": {
            "node": self.node, "endpoints": new, "endpoint": new[self.core.endpoint]}})
        sockets[:] = renumbered
        self.endpoints = new

    def _loop(self, sockets: list[zmq.Socket[bytes]]) -> None:
        # New durable records wake the thread through an eventfd polled with the sockets
        # (the queue's durable listener writes it once per group commit), so the thread
        # sleeps until a reply, new records or a deadline instead of polling every 2 ms.
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

        def on_durable(seq: int) -> None:
            if seq >= self._wake_at:
                with contextlib.suppress(OSError):
                    signal_eventfd(wake)

        self.queue.add_durable_listener(on_durable)
        try:
            self._forward(sockets, wake)
        finally:
            self.queue.remove_durable_listener(on_durable)
            os.close(wake)

    def _forward(self, sockets: list[zmq.Socket[bytes]], wake: int) -> None:
        core, queue = self.core, self.queue
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        index_of: dict[Any, int] = {}
        for i, sock in enumerate(sockets):
            poller.register(sock, zmq.POLLIN)
            index_of[sock] = i
        acked_through = core.acked_through   # acked by a middle...
        cursor = queue.acked(CONSUMER)       # ...and recorded in the queue's ledger
        last_cursor_write = 0.0
        waiting_since: float | None = None   # when unsent records were first seen
        while not self._stop.is_set():
            new_endpoints = self._take_pending()
            if new_endpoints is not None:
                self._apply_endpoints(new_endpoints, sockets, poller, index_of)
            now = time.monotonic()
            # Fill the window from the durable head of the queue. While batches are in
            # flight, a small batch waits up to `linger` for more records (fewer, fuller
            # batches: less per-batch work here, in the middle and in the ledger).
            # Only durable records are readable: appended ones still being synced would
            # make this loop spin with nothing to read until their group commit is done
            # (the eventfd wakes it then).
            while core.can_send(now) and (durable := queue.durable_seq) >= core.next_seq:
                if waiting_since is None:
                    waiting_since = now
                if (not core.idle() and durable + 1 - core.next_seq < self.batch_records
                        and now - waiting_since < self.linger):
                    break
                records = queue.read(core.next_seq, max_records=self.batch_records,
                                     max_bytes=self.batch_bytes)
                if not records:
                    break
                waiting_since = None
                send = core.add(records[0].seq, [r.payload for r in records], now)
                _send(sockets[send.endpoint], send.frames)
            # The ledger write is an fdatasync: do it at most every `cursor_interval` (a
            # drain waits on it: at most that much longer). Losing a cursor update in a
            # crash only means resending batches the middle deduplicates.
            if cursor < acked_through and now - last_cursor_write >= self.cursor_interval:
                queue.ack(CONSUMER, acked_through)
                cursor, last_cursor_write = acked_through, now
            # Sleep until a reply, new durable records (the eventfd) or the next deadline:
            # a resend, the cursor write owed, or the end of a small batch's linger.
            wait_s = 0.05
            deadline = core.next_deadline()
            if deadline is not None:
                wait_s = min(wait_s, deadline - now)
            if cursor < acked_through:
                wait_s = min(wait_s, last_cursor_write + self.cursor_interval - now)
            if waiting_since is not None and core.can_send(now) \
                    and queue.durable_seq >= core.next_seq:
                wait_s = min(wait_s, waiting_since + self.linger - now)
            # A wake-up per group commit only when it would send: at the first new record
            # when nothing is in flight; while batches are, at a full batch (a reply wakes
            # the thread before that anyway, and starts a smaller batch's linger); never
            # while the window is full. Set before durable_seq is read again, so a group
            # that ends in between is seen here or signals.
            if not core.can_send(now):
                self._wake_at = _NEVER
                if core.paused_until > now:  # a busy middle's retry time
                    wait_s = min(wait_s, core.paused_until - now)
            elif core.idle():
                self._wake_at = core.next_seq
            else:
                self._wake_at = core.next_seq + self.batch_records - 1
            if queue.durable_seq >= self._wake_at:
                wait_s = 0.0
            for sock, _ in poller.poll(max(0, int(wait_s * 1000 + 0.999))):
                if sock == wake:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(wake)
                    continue
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    advanced = core.on_reply(index_of[sock], frames, time.monotonic())
                    if advanced is not None:
                        acked_through = advanced
            for send in core.poll(time.monotonic()):
                _send(sockets[send.endpoint], send.frames)
        if cursor < acked_through:
            queue.ack(CONSUMER, acked_through)


def _send(sock: zmq.Socket[bytes], frames: list[bytes]) -> None:
    # Never block on a peer that is gone: an unsent batch times out and is resent.
    try:
        sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        log.warning("middle endpoint send queue full; will resend on timeout")
