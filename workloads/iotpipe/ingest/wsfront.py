"""The device WebSocket front on websockets: kept for ``--compression`` (permessage-deflate).

Each connection is a reader task and a sender task joined by a bounded outbox. The reader
feeds every frame to the sans-I/O ``DeviceSession`` and queues the replies (error frames at
once; for good messages the commit group's future, the ids and the read time). The sender
writes them in order, an ack only once its group is durable. A connection is read at most
``OUTBOX_FRAMES`` frames ahead of its replies: while appends wait for queue space it stops
being read (backpressure), and after ``busy_wait`` the waiting frames are answered busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from typing import TYPE_CHECKING

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from iotpipe.ingest.acks import settled_reply
from iotpipe.ingest.core import CLOSE_INTERNAL, DeviceSession
from iotpipe.ingest.front import OUTBOX_FRAMES, Refusal

if TYPE_CHECKING:
    from iotpipe.ingest.server import IngestServer

__all__ = ["WebsocketsFront"]

# What a connection's sender gets: a reply frame, (durable future, ids, read time) for an
# ack, or None to stop.
_Reply = bytes | tuple["asyncio.Future[range]", list[str | int], float] | None


class WebsocketsFront:
    """The listening socket and the device connections of one process, on websockets."""

    def __init__(self, server: IngestServer) -> None:
        self.server = server
        self.ws_server: Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> int:
        s = self.server.settings
        self.ws_server = await serve(
            self.handle, host, port,
            process_request=self.process_request,
            compression="deflate" if s.compression else None,
            max_size=s.max_frame_bytes,
            open_timeout=s.open_timeout,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            close_timeout=5,
            reuse_port=reuse_port,
            backlog=s.listen_backlog,
            ssl=ssl_context,
        )
        return int(self.ws_server.sockets[0].getsockname()[1])

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (none before start)."""
        return tuple(self.ws_server.sockets) if self.ws_server is not None else ()

    @property
    def connections(self) -> list[ServerConnection]:
        return list(self.ws_server.connections) if self.ws_server is not None else []

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        verdict = self.server.admit(request.path, request.headers.get("Authorization"))
        if isinstance(verdict, Refusal):
            response = connection.respond(verdict.status, verdict.body)
            response.headers.update(verdict.headers)
            return response
        connection.device_id = verdict.device_id  # type: ignore[attr-defined]
        connection.token_id = verdict.token_id  # type: ignore[attr-defined]
        return None

    def request_close(self, conn: ServerConnection, code: int, reason: str) -> None:
        """Close ``conn`` with ``code`` (websockets sends what is queued first)."""
        self.server.counters.closes[str(code)] += 1
        task = asyncio.get_running_loop().create_task(conn.close(code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def stop_listening(self) -> None:
        if self.ws_server is not None:
            self.ws_server.close(close_connections=False)

    async def wait_closed(self, _connections: list[ServerConnection], within: float) -> None:
        """Wait for the closes requested and for every handler (its appends acked) to end."""
        for tasks in (self._closing, self._handlers):
            if tasks:
                await asyncio.wait(list(tasks), timeout=max(0.1, within))

    async def aclose(self) -> None:
        if self.ws_server is not None:
            self.ws_server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ws_server.wait_closed(), 5)

    # -- one device --------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)  # type: ignore[arg-type]
        server = self.server
        loop = asyncio.get_running_loop()
        device: str | None = getattr(ws, "device_id", None)
        session = DeviceSession(device, bucket=server.buckets.acquire(device, loop.time()),
                                limits=server.limits, flood_limit=server.settings.flood_limit)
        outbox: asyncio.Queue[_Reply] = asyncio.Queue(maxsize=OUTBOX_FRAMES)
        sender = asyncio.create_task(self._sender(ws, outbox))
        counters = server.counters
        counters.connections += 1
        try:
            await self._read_loop(ws, session, outbox)
        except ConnectionClosed:
            pass
        finally:
            counters.connections -= 1
            server.buckets.release(device)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sender
            self._handlers.discard(task)  # type: ignore[arg-type]

    async def _read_loop(self, ws: ServerConnection, session: DeviceSession,
                         outbox: asyncio.Queue[_Reply]) -> None:
        server = self.server
        assert server.aqueue is not None
        loop = asyncio.get_running_loop()
        aqueue = server.aqueue
        busy_wait = server.settings.busy_wait
        counters = server.counters
        while True:
            frame = await ws.recv(decode=False)
            read_at = loop.time()
            outcome = session.on_frame(frame, read_at, time.time_ns())
            if outcome.rejected:
                counters.rejected.update(outcome.rejected)
            for reply in outcome.replies:
                await outbox.put(reply)
            if outcome.readings:
                # The sender acks once the append is durable; this loop reads on until the
                # outbox is full, which is the backpressure.
                pending = (aqueue.submit(outcome.readings, busy_wait), outcome.ids, read_at)
                if outbox.full():
                    await outbox.put(pending)
                else:  # the common case, without a coroutine per frame
                    outbox.put_nowait(pending)
            if outcome.close is not None:
                await self._close_after_flush(ws, outbox, *outcome.close)
                return

    async def _close_after_flush(self, ws: ServerConnection, outbox: asyncio.Queue[_Reply],
                                 code: int, reason: str) -> None:
        self.server.counters.closes[str(code)] += 1
        await outbox.put(None)  # the sender sends what is queued, then stops
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(outbox.join(), timeout=self.server.settings.busy_wait + 5.0)
        # Frames the device already sent are read and dropped while closing: websockets
        # stops reading the socket when its frame buffer is full, and would then never
        # see the device's close reply (waiting close_timeout instead).
        closing = asyncio.create_task(ws.close(code, reason))
        with contextlib.suppress(ConnectionClosed):
            while not closing.done():
                await ws.recv(decode=False)
        await closing

    async def _sender(self, ws: ServerConnection, outbox: asyncio.Queue[_Reply]) -> None:
        """Sends replies in order; an ack only after its append is durable."""
        counters = self.server.counters
        busy_retry_ms = self.server.settings.busy_retry_ms
        loop = asyncio.get_running_loop()
        closed = False
        while True:
            item = await outbox.get()
            try:
                if item is None:
                    return
                if isinstance(item, tuple):
                    durable, ids, read_at = item
                    with contextlib.suppress(Exception):  # settled_reply reads the outcome
                        await durable
                    frame, failed = settled_reply(durable, ids, loop.time() - read_at,
                                                  counters, busy_retry_ms)
                    if failed:  # never ack after a queue failure: tell the device, close
                        if not closed:
                            with contextlib.suppress(ConnectionClosed):
                                await ws.send(frame, text=True)
                        self.request_close(ws, CLOSE_INTERNAL, "queue failure")
                        closed = True
                        continue
                else:
                    frame = item
                if not closed:
                    await ws.send(frame, text=True)
            except ConnectionClosed:
                # Keep consuming (and dropping) replies so the read loop never blocks on a
                # full outbox; it learns of the close from its next recv.
                closed = True
            finally:
                outbox.task_done()
