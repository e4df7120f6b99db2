"""How the relay writes frames to its clients' WebSocket connections (server.py's send side).

websockets runs each connection (handshake, reading, pings, closing); its per-message send
path cost most of the relay's CPU, so in *direct* mode the relay writes frames that the
``Fanout`` already framed (:func:`text_frame`) to the transport itself, each client's
waiting frames in one write (:func:`write_direct`). With compression, frames go through
websockets' send path (:func:`send_frames`), which keeps each connection's deflate state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from iotpipe.relay.core import ClientSession
from iotpipe.wsframes import encode_text_frames

__all__ = ["BatchingConnection", "Peer", "WriteCoalescer", "send_frames", "text_frame",
           "write_direct"]

_OPEN = State.OPEN


def text_frame(payload: bytes) -> bytes:
    """One unmasked server-to-client text frame (RFC 6455 5.2), ready to write."""
    return encode_text_frames([payload])


class BatchingConnection(ServerConnection):
    """A server connection that writes every frame queued at once in one transport write.

    With ``--compression`` the relay's sender hands websockets up to 64 frames at a time,
    which it would write separately, one ``send`` syscall each (docs/design.md, "Notes").
    Joining them changes nothing on the wire. In direct mode the relay writes to the
    transport itself and learns here when a paused transport can take more.
    """

    # Called when the transport drained below its low-water mark after a pause, and when
    # the connection is lost (set by the relay for connections it writes to directly).
    on_writable: Callable[[], None] | None = None

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.on_writable is not None:
            self.on_writable()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.on_writable is not None:
            self.on_writable()

    def send_data(self) -> None:
        pending: list[bytes] = []
        for data in self.protocol.data_to_send():
            if data:
                pending.append(data)
                continue
            # An empty chunk means "end of stream": flush, then half-close as websockets does.
            if pending:
                self.transport.write(b"".join(pending))
                pending = []
            if self.transport.can_write_eof():
                with contextlib.suppress(Exception):  # uvloop may raise RuntimeError
                    self.transport.write_eof()
            else:
                self.transport.close()
        if pending:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))


async def send_frames(connection: ServerConnection, frames: list[bytes]) -> None:
    """Send JSON text frames as separate messages with one write and one drain."""
    async with connection.send_context():
        protocol = connection.protocol
        for frame in frames:
            protocol.send_text(frame)


@dataclass
class Peer:
    """One client's connection, session and the events its tasks wait on."""

    connection: BatchingConnection
    session: ClientSession
    wake: asyncio.Event  # frames queued (sender-task mode)
    progress: asyncio.Event  # frames left the queue


class WriteCoalescer:
    """Which woken clients to write now, and which to leave for one later write (sans-I/O).

    The SUB reader routes events in bursts of a few hundred. A client that has
    ``flush_frames`` or more frames waiting is written at once; one with fewer waits until
    the SUB socket runs dry or ``flush_interval`` passed since the oldest such wait, so a
    client following a few devices gets one write for many bursts instead of one per burst
    (with 1,000 such clients that was a write syscall per client per burst).

    The wait only happens while the relay is saturated (the socket never runs dry within a
    callback); then it adds at most ``flush_interval`` to a sparse client's latency and cuts
    the relay's write syscalls by the same factor: at 1,000 clients following one device
    each, 20 ms gave 1.25-1.35M frames per CPU-second against 0.70-0.96M at 5 ms.
    """

    def __init__(self, flush_frames: int = 64, flush_interval: float = 0.02) -> None:
        self.flush_frames = flush_frames
        self.flush_interval = flush_interval
        self._waiting: set[str] = set()
        self._since = 0.0

    def woken(self, client_id: str, pending: int, now: float) -> bool:
        """``client_id`` got frames (``pending`` now wait): True to write it now."""
        if pending >= self.flush_frames:
            self._waiting.discard(client_id)
            return True
        if not self._waiting:
            self._since = now
        self._waiting.add(client_id)
        return False

    def due(self, now: float, drained: bool) -> list[str]:
        """The clients to write now (all that wait, once the socket ran dry or the oldest
        waited ``flush_interval``); they are forgotten here."""
        if not self._waiting or not (drained or now - self._since >= self.flush_interval):
            return []
        due = list(self._waiting)
        self._waiting.clear()
        return due


def write_direct(peer: Peer, now: float) -> int:
    """Write every frame ``peer`` has waiting in one transport write; how many were written.

    Nothing is written while the transport is paused (the frames wait in the session's
    bounded queue, which counts what it drops, and the stall clock runs) or once websockets
    started closing: a data frame after a close frame would break the protocol. Frames
    websockets writes itself (pong, close) are whole frames too, so the two never
    interleave inside a frame.
    """
    connection = peer.connection
    session = peer.session
    if connection.protocol.state is not _OPEN or connection.transport.is_closing():
        # Nothing more can be sent: release a handler waiting for queue room.
        session.closed = True
        peer.progress.set()
        return 0
    if connection.paused:
        return 0
    transport = connection.transport
    frames = session.take(now, session.pending)
    if not frames:
        return 0
    transport.write(frames[0] if len(frames) == 1 else b"".join(frames))
    peer.progress.set()
    return len(frames)
