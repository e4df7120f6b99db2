"""The device WebSocket front on picows: a thin shell around ``DeviceSession``.

picows (Cython) parses frames and answers pings in C and calls ``on_ws_frame`` once per
frame, with no task or future per message; websockets spends most of ingest's CPU in its
per-message send and receive paths (issue 11). Everything the device protocol decides
stays in ``iotpipe.ingest.core`` (the sans-I/O session judges each frame); this module only
moves bytes and keeps order:

- each connection keeps its replies in order in one deque: error frames (ready at once)
  and pending acks (a commit group's future, the ids, the read time);
- when a commit group becomes durable, every connection waiting on it writes all of its
  replies that are ready now in ONE socket write (acks of frames that completed in the
  same loop turn leave together);
- backpressure: with ``OUTBOX_FRAMES`` replies outstanding the socket stops being read
  (``pause_reading``); frames already received meanwhile wait unjudged and are judged in
  order once replies drain, so a device is never judged more than that far ahead;
- closes requested by the protocol (1008 flood), the server (1001 drain, 1011 queue
  failure) or the deny list are sent after the replies already owed;
- a message split over continuation frames is joined, with ``max_frame_bytes`` applied to
  the whole message (1009), as websockets' ``max_size`` did.

No permessage-deflate: picows has none (``--compression`` uses the websockets front).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from picows import (
    WSAutoPingStrategy,
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSProtocolError,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from iotpipe.ingest.acks import settled_reply
from iotpipe.ingest.core import CLOSE_INTERNAL, DeviceSession, encode_ack_frame
from iotpipe.wsframes import encode_text_frames

if TYPE_CHECKING:
    from iotpipe.ingest.server import IngestServer

__all__ = ["OUTBOX_FRAMES", "Admitted", "DeviceConnection", "PicowsFront", "Refusal"]

# A logger adapter, not a Logger: picows then creates no child logger per connection
# (it would keep 100k of them alive).
_PICOWS_LOG = logging.LoggerAdapter(logging.getLogger("picows.ingest"), {})

# Replies a connection may owe before its socket stops being read (docs/protocols.md: a
# busy device is read at most 16 frames ahead).
OUTBOX_FRAMES = 16
# Seconds to wait for the device's close frame after ours before dropping the socket.
CLOSE_TIMEOUT = 5.0

_TEXT = WSMsgType.TEXT
_BINARY = WSMsgType.BINARY
_CONTINUATION = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE


class Refusal(NamedTuple):
    """A refused handshake: HTTP status, a text body whose first word is the reason."""

    status: int
    body: str
    headers: dict[str, str]


class Admitted(NamedTuple):
    """An accepted handshake: the device (None: named per message) and the token's id."""

    device_id: str | None
    token_id: str | None


# An ack owed once its commit group's future is done: (future, the frame's ids, when the
# frame was read). A tuple: one is made per frame.
_Pending = tuple["asyncio.Future[range]", list[str | int], float]


class DeviceConnection(WSListener):  # type: ignore[misc]  # picows ships no stub base
    """One device's connection: frames in through the session, replies out in order."""

    def __init__(self, front: PicowsFront, device_id: str | None,
                 token_id: str | None) -> None:
        super().__init__()
        self.front = front
        self.device_id = device_id
        self.token_id = token_id
        self.transport: WSTransport | None = None
        self.session: DeviceSession | None = None
        self.closed: asyncio.Future[None] = front.loop.create_future()
        self._replies: deque[bytes | _Pending] = deque()
        self._deferred: deque[bytes] = deque()
        self._fragments: list[bytes] | None = None
        self._fragment_bytes = 0
        self._paused = False
        self._watching: asyncio.Future[range] | None = None
        self._close: tuple[int, str] | None = None   # a close owed after the replies
        self._close_sent = False
        self._close_timer: asyncio.TimerHandle | None = None
        # Read per frame: looked up once.
        server = front.server
        self._counters = server.counters
        self._clock = front.loop.time

    # -- picows callbacks ---------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        front = self.front
        self.transport = transport
        server = front.server
        self.session = DeviceSession(
            self.device_id, bucket=server.buckets.acquire(self.device_id, front.loop.time()),
            limits=server.limits, flood_limit=server.settings.flood_limit)
        front.connections.add(self)
        server.counters.connections += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        front = self.front
        if self in front.connections:
            front.connections.discard(self)
            front.server.counters.connections -= 1
            front.server.buckets.release(self.device_id)
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._deferred.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind in (_TEXT, _BINARY):
            if self._fragments is not None:
                raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR,
                                      "a new message started inside a fragmented one")
            if frame.fin:
                self._on_message(frame.get_payload_as_bytes())
            else:
                self._fragments = [frame.get_payload_as_bytes()]
                self._fragment_bytes = frame.payload_size
        elif kind == _CONTINUATION:
            if self._fragments is None:
                raise WSProtocolError(WSCloseCode.PROTOCOL_ERROR,
                                      "continuation frame without a message to continue")
            self._fragment_bytes += frame.payload_size
            limit = self.front.server.settings.max_frame_bytes
            if self._fragment_bytes > limit:
                raise WSProtocolError(WSCloseCode.MESSAGE_TOO_BIG,
                                      f"message larger than {limit} bytes")
            self._fragments.append(frame.get_payload_as_bytes())
            if frame.fin:
                payload = b"".join(self._fragments)
                self._fragments = None
                self._on_message(payload)
        elif kind == _CLOSE:
            if not self._close_sent:
                # The device closes: echo its code (RFC 6455 5.5.1), then hang up.
                self._close_sent = True
                transport.send_close(frame.get_close_code())
            transport.disconnect()
        # PING is answered by picows itself; PONG feeds its keepalive.

    # -- frames in ----------------------------------------------------------------------

    def _on_message(self, payload: bytes) -> None:
        if self._close is not None or self._close_sent:
            return  # closing: frames the device already sent are read and dropped
        if self._paused:
            self._deferred.append(payload)
            return
        self._judge(payload)
        # Most frames only add an ack waiting for its commit group: nothing to write yet.
        replies = self._replies
        if self._close is not None or len(replies) >= OUTBOX_FRAMES:
            self._flush()
        elif replies:
            head = replies[0]
            if head.__class__ is bytes or head[0].done():  # type: ignore[union-attr]
                self._flush()

    def _judge(self, payload: bytes) -> None:
        session = self.session
        assert session is not None
        read_at = self._clock()
        outcome = session.on_frame(payload, read_at, time.time_ns())
        if outcome.rejected:
            self._counters.rejected.update(outcome.rejected)
        replies = self._replies
        if outcome.replies:
            replies.extend(outcome.replies)
        if outcome.readings:
            server = self.front.server
            assert server.aqueue is not None
            durable = server.aqueue.submit(outcome.readings, server.settings.busy_wait)
            replies.append((durable, outcome.ids, read_at))
            if self._watching is not durable:  # once per group and connection
                self._watching = durable
                self.front.watch(durable, self)
        if outcome.close is not None:
            self._close = outcome.close

    # -- replies out --------------------------------------------------------------------

    def _write_ready(self) -> None:
        """Send every reply at the head that is ready, in one write."""
        replies = self._replies
        if not replies:
            return
        out: list[bytes] = []
        counters = self._counters
        now = self._clock()
        failed = False
        while replies:
            item = replies[0]
            if item.__class__ is bytes:
                out.append(item)  # type: ignore[arg-type]
            else:
                durable, ids, read_at = item  # type: ignore[misc]
                if not durable.done():
                    break
                if durable.exception() is None:  # the common case, without a call
                    counters.observe_acked(len(ids), now - read_at)
                    out.append(encode_ack_frame(ids))
                else:
                    frame, failed = settled_reply(durable, ids, now - read_at, counters,
                                                  self.front.server.settings.busy_retry_ms)
                    out.append(frame)
            replies.popleft()
            if failed:
                break
        if failed:
            replies.clear()  # nothing after a queue failure is acked
            self._deferred.clear()
            self._close = (CLOSE_INTERNAL, "queue failure")
        self._send(out)

    def _send(self, frames: list[bytes]) -> None:
        transport = self.transport
        if not frames or transport is None or self._close_sent \
                or transport.is_close_frame_sent or transport.is_disconnected:
            return
        if len(frames) == 1:
            transport.send(_TEXT, frames[0])
        else:
            transport.underlying_transport.write(encode_text_frames(frames))

    def _flush(self) -> None:
        """Write what is ready, apply backpressure, and close when the replies are out."""
        self._write_ready()
        transport = self.transport
        if transport is None or transport.is_disconnected:
            return
        if self._paused:
            if len(self._replies) < OUTBOX_FRAMES:
                self._paused = False
                deferred = self._deferred
                while deferred and self._close is None:
                    self._judge(deferred.popleft())
                    self._write_ready()
                    if len(self._replies) >= OUTBOX_FRAMES:
                        self._paused = True
                        break
                if not self._paused:
                    transport.underlying_transport.resume_reading()
        elif len(self._replies) >= OUTBOX_FRAMES:
            self._paused = True
            transport.underlying_transport.pause_reading()
        if self._close is not None and not self._replies and not self._close_sent:
            self._send_close(*self._close)

    def _send_close(self, code: int, reason: str) -> None:
        transport = self.transport
        assert transport is not None
        self._close_sent = True
        self._deferred.clear()
        if self._paused:  # read on, so the device's close reply is seen
            self._paused = False
            transport.underlying_transport.resume_reading()
        self.front.server.counters.closes[str(code)] += 1
        transport.send_close(code, reason.encode())
        self._close_timer = self.front.loop.call_later(CLOSE_TIMEOUT, transport.disconnect)

    # -- asked by the server ------------------------------------------------------------

    def request_close(self, code: int, reason: str) -> None:
        """Close with ``code`` once the replies owed so far are sent."""
        if self._close is None and not self._close_sent:
            self._close = (code, reason)
            self._flush()


def _flush_all(connections: list[DeviceConnection], _durable: asyncio.Future[range]) -> None:
    """A commit group is durable: each connection waiting on it writes what is ready."""
    for conn in connections:
        try:
            conn._flush()
        except Exception:  # one connection's failure must not hold the others' acks
            _PICOWS_LOG.exception("writing replies failed")


class PicowsFront:
    """The listening socket and the open device connections of one ingest process."""

    def __init__(self, server: IngestServer,
                 admit: Callable[[str, str | None], Admitted | Refusal]) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.connections: set[DeviceConnection] = set()
        self._admit = admit
        self._listener: asyncio.Server | None = None
        self.port = 0
        # The open commit group and the connections owed replies when it is durable.
        self._group: asyncio.Future[range] | None = None
        self._group_connections: list[DeviceConnection] = []

    def watch(self, durable: asyncio.Future[range], conn: DeviceConnection) -> None:
        """``conn`` writes its ready replies once ``durable`` is done.

        One callback per commit group, not per connection: at one frame per connection and
        group (devices sending slower than groups commit), a callback per connection cost a
        loop handle per message. The open group's future is always the newest, so a
        future other than the last one watched starts a new list.
        """
        if durable is not self._group:
            self._group = durable
            self._group_connections = [conn]
            durable.add_done_callback(functools.partial(_flush_all, self._group_connections))
        else:
            self._group_connections.append(conn)

    def _factory(self, request: WSUpgradeRequest) -> Any:
        path = request.path.decode("latin-1")
        verdict = self._admit(path, request.headers.get("Authorization"))
        if isinstance(verdict, Refusal):
            headers = {"Content-Type": "text/plain; charset=utf-8", **verdict.headers}
            response = WSUpgradeResponse.create_error_response(
                verdict.status, verdict.body.encode(), headers)
            return WSUpgradeResponseWithListener(response, None)
        return DeviceConnection(self, verdict.device_id, verdict.token_id)

    async def start(self, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                    reuse_port: bool = False) -> int:
        s = self.server.settings
        self._listener = await ws_create_server(
            self._factory, host, port,
            websocket_handshake_timeout=s.open_timeout,
            logger_name=_PICOWS_LOG,
            # Pings only connections silent for ping_interval: a device that sends is alive.
            enable_auto_ping=True,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            auto_ping_idle_timeout=s.ping_interval,
            # picows requires reply timeout <= idle timeout.
            auto_ping_reply_timeout=min(s.ping_timeout, s.ping_interval),
            max_frame_size=s.max_frame_bytes,
            # Grown on demand; 16 KiB (picows' default) per idle device adds up at 100k.
            read_buffer_init_size=4096,
            ssl=ssl_context,
            # aiofastnet (picows' faster transport) runs TLS itself and ignores the context's
            # sni_callback, which the certificate reload relies on (tlsconfig.py): with TLS
            # the loop's own transport is used.
            use_aiofastnet=False if ssl_context is not None else None,
            backlog=s.listen_backlog,
            reuse_port=reuse_port or None,
        )
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self.port

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (none before start)."""
        return tuple(self._listener.sockets) if self._listener is not None else ()

    def stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def request_close(self, conn: DeviceConnection, code: int, reason: str) -> None:
        """Close ``conn`` with ``code`` once the replies it is owed are sent."""
        conn.request_close(code, reason)

    async def wait_closed(self, connections: list[DeviceConnection], within: float) -> None:
        futures = [c.closed for c in connections if not c.closed.done()]
        if futures:
            await asyncio.wait(futures, timeout=max(0.01, within))

    async def aclose(self, within: float = 5.0) -> None:
        """Stop listening and hang up on every device at once."""
        self.stop_listening()
        connections = list(self.connections)
        for conn in connections:
            if conn.transport is not None:
                conn.transport.disconnect()
        await self.wait_closed(connections, within)
        if self._listener is not None:
            await self._listener.wait_closed()
