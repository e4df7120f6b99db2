"""``iotpipe relay``: the I/O shell around :mod:`iotpipe.relay.core`.

One asyncio loop owns everything: a ZeroMQ SUB socket connected to every middle PUB
endpoint, the WebSocket server on ``/v1/live`` and a watchdog that closes clients which
stopped reading. Per-event work is the sans-I/O ``Fanout``; this module only moves frames
between sockets and the core.

Sending: websockets runs the handshake (auth, the page's HTTP routes, TLS), reads client
frames, answers pings and closes, but its per-message send path cost most of the relay's
CPU (docs/benchmarks.md, Relay). So without compression the ``Fanout`` queues each frame
already framed for the wire (unmasked server frames are the same bytes for every client,
so a reading is framed once for all its clients) and the reader of the SUB socket writes
each woken client's frames in ONE transport write while the connection is open and its
transport not paused: at once when a few dozen wait, else once the SUB socket ran dry
(``WriteCoalescer``), so a client following a few devices gets one write for many bursts; a
paused transport resumes through ``resume_writing``. With ``--compression`` each connection
keeps a sender task and websockets' send path (per-connection deflate state).

``--middle-pub-endpoints-file`` (key ``pub`` of the operator's endpoints ConfigMap) is
re-read every ``--endpoints-reload-seconds``: the SUB socket connects to added middles and
disconnects from removed ones while clients stay connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import zmq
from prometheus_client import REGISTRY, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from iotpipe import lifecycle
from iotpipe.auth import load_secret
from iotpipe.curve import load_keys, secure_client
from iotpipe.denylist import CLOSE_REVOKED, DenyList, DenyListFile, reload_security
from iotpipe.endpoints import (
    EndpointsCollector,
    EndpointsError,
    EndpointsFile,
    diff_endpoints,
    resolve_endpoints,
)
from iotpipe.observability import ObservabilityServer, PortInUse, setup_logging
from iotpipe.registry import RegistryWatcher
from iotpipe.relay.core import (
    CLOSE_SLOW_CONSUMER,
    LIVE_PATH,
    UNKNOWN,
    ClientSession,
    Fanout,
    Refused,
    admit,
)
from iotpipe.relay.metrics import RelayCollector
from iotpipe.relay.sending import (
    BatchingConnection,
    Peer,
    WriteCoalescer,
    send_frames,
    text_frame,
    write_direct,
)
from iotpipe.relay.settings import RelaySettings
from iotpipe.relay.web import WebFront, parse_health_targets
from iotpipe.security import check_security_settings
from iotpipe.settings import parse_settings
from iotpipe.tlsconfig import ReloadingTLS
from iotpipe.wire import LiveEvent, WireError, decode_live_events
from iotpipe.zmqmonitor import pending_events

__all__ = ["LIVE_PATH", "RelayServer", "RelaySettings", "main"]

log = logging.getLogger("iotpipe.relay")

# Upstream events handled per reader callback before the loop's other work gets a turn.
_SUB_BURST = 512
# A plain int: pyzmq's enum flags cost microseconds per operation on the hot path.
_NOBLOCK = int(zmq.NOBLOCK)
_HANDSHAKE = int(zmq.EVENT_HANDSHAKE_SUCCEEDED)
_DISCONNECTED = int(zmq.EVENT_DISCONNECTED)
_BINARY_REPLY = (b'{"event":"error","reason":"binary_not_supported",'
                 b'"detail":"send JSON text frames"}')


class RelayServer:
    """The running relay: SUB loop, WebSocket server, per-client senders, stall watchdog."""

    def __init__(self, settings: RelaySettings, secret: bytes | None,
                 endpoints: list[str] | None = None,
                 endpoints_file: EndpointsFile | None = None) -> None:
        if secret is None and not settings.insecure_no_auth:
            raise ValueError("a secret is required unless insecure_no_auth is set")
        self.settings = settings
        self.endpoints = list(settings.middle_pub_endpoints if endpoints is None else endpoints)
        self.endpoints_file = endpoints_file
        self.secret = secret
        self.curve_keys = (load_keys(settings.curve_keys_dir, "relay")
                           if settings.curve_keys_dir else None)
        self.tls = ReloadingTLS(settings.tls_cert, settings.tls_key) if settings.tls_cert else None
        self.deny_file = DenyListFile(settings.deny_list_file) if settings.deny_list_file else None
        self.deny = self.deny_file.current if self.deny_file else DenyList()
        self.registry = RegistryWatcher(settings.registry_file)
        # Frames are written pre-framed unless per-connection deflate may be negotiated.
        self.direct = not settings.compression
        self.fanout = Fanout(self._lookup, framing=text_frame if self.direct else None)
        self.bad_frames = 0
        self._ids = itertools.count(1)
        self._peers: dict[str, Peer] = {}
        # Direct mode: when _drain_sub writes the clients it queued frames for.
        self._coalescer = WriteCoalescer()
        self._connections: dict[str, ServerConnection] = {}
        self._server: Server | None = None
        self._ready = False
        self.port = settings.port
        self.rejected: Counter[str] = Counter()  # handshake refusals by reason
        self.slow_closes = 0
        self.frames_sent = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._sub: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None
        self.upstreams: dict[str, bool] = {}  # middle PUB endpoint -> connected now
        # Looked up through the watcher each time: the registry file is reloaded when it changes.
        self.web = WebFront(secret, lambda device_id: self.registry.current.lookup(device_id),
                            settings.history_urls,
                            parse_health_targets(settings.health_urls),
                            lambda: generate_latest(REGISTRY).decode(),
                            lambda: self.registry.current.devices()) if settings.web else None

    # -- registry -------------------------------------------------------------------------

    def _lookup(self, device_id: str) -> tuple[str, str]:
        info = self.registry.current.lookup(device_id)
        if info is None:
            return (UNKNOWN, UNKNOWN)
        return (info.device_class, info.location)

    @property
    def ready(self) -> bool:
        """Serving, and subscribed to at least one middle (when any is configured)."""
        if not self._ready:
            return False
        return not self.endpoints or any(self.upstreams.values())

    # -- handshake ------------------------------------------------------------------------

    def _reject(self, connection: ServerConnection, status: HTTPStatus, reason: str,
                detail: str) -> Response:
        self.rejected[reason] += 1
        response = connection.respond(status, f"{reason}: {detail}\n")
        return response

    async def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        """Plain HTTP requests for any path but the live endpoint go to the page and its API
        (when enabled); WebSocket handshakes keep the protocol's refusals."""
        if (self.web is not None and urlsplit(request.path).path != LIVE_PATH
                and "Upgrade" not in request.headers):
            return await self.web.respond(request)
        return self._process_request(connection, request)

    def _process_request(self, connection: ServerConnection, request: Request
                         ) -> Response | None:
        url = urlsplit(request.path)
        verdict = admit(url.path, parse_qs(url.query), request.headers.get("Authorization"),
                        self.secret, self.deny, len(self.fanout.sessions),
                        self.settings.max_clients)
        if isinstance(verdict, Refused):
            return self._reject(connection, HTTPStatus(verdict.status), verdict.reason,
                                verdict.detail)
        connection.iotpipe_subject = verdict.subject  # type: ignore[attr-defined]
        connection.iotpipe_token_id = verdict.token_id  # type: ignore[attr-defined]
        return None

    # -- reloads (TLS certificate, deny list) ------------------------------------------------

    def reload_deny_list(self) -> int:
        """Re-read the deny list; close the open connections it now refuses (how many)."""
        if self.deny_file is None:
            return 0
        closed = self.deny_file.revoke(
            "client", self._connections.values(),
            lambda c: (getattr(c, "iotpipe_subject", None), getattr(c, "iotpipe_token_id", None)),
            self._close_revoked)
        self.deny = self.deny_file.current
        return closed

    def _close_revoked(self, connection: ServerConnection, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(connection.close(CLOSE_REVOKED, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _reload_security(self) -> None:
        settings = self.settings
        await reload_security(self.tls, settings.tls_reload_seconds, self.reload_deny_list,
                              settings.deny_list_reload_seconds)

    # -- per-client ------------------------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        assert isinstance(connection, BatchingConnection)
        subject = str(getattr(connection, "iotpipe_subject", "anonymous"))
        client_id = f"{subject}#{next(self._ids)}"
        session = ClientSession(client_id, self.settings.client_queue, self.settings.max_filters)
        peer = Peer(connection, session, asyncio.Event(), asyncio.Event())
        loop = asyncio.get_running_loop()
        session.mark_progress(loop.time())
        self.fanout.add(session)
        self._peers[client_id] = peer
        self._connections[client_id] = connection
        sender: asyncio.Task[None] | None = None
        if self.direct:
            connection.on_writable = lambda: self._write(peer, loop.time())
        else:
            sender = asyncio.create_task(self._sender(peer))
        try:
            async for message in connection:
                # Replies go through the client's queue so they stay in order with events.
                if isinstance(message, bytes):
                    session.notify(session.wire(_BINARY_REPLY), loop.time())
                else:
                    session.answer(message, loop.time())
                self._wake(peer, loop.time())
                # A client that sends without reading must not grow its queue: wait for the
                # sender (the stall watchdog closes the connection if it never drains).
                while session.pending > session.queue_limit and not session.closed:
                    peer.progress.clear()
                    await peer.progress.wait()
        except ConnectionClosed:
            pass
        finally:
            self.fanout.remove(client_id)
            self._peers.pop(client_id, None)
            self._connections.pop(client_id, None)
            connection.on_writable = None
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await sender

    def _wake(self, peer: Peer, now: float) -> None:
        """New frames for ``peer``: write them now, or wake its sender task."""
        if self.direct:
            self._write(peer, now)
        else:
            peer.wake.set()

    def _write(self, peer: Peer, now: float) -> None:
        self.frames_sent += write_direct(peer, now)

    async def _sender(self, peer: Peer) -> None:
        connection, session, wake, progress = peer.connection, peer.session, peer.wake, \
            peer.progress
        loop = asyncio.get_running_loop()
        try:
            while True:
                frames = session.take(loop.time())
                if not frames:
                    wake.clear()
                    if session.pending:
                        continue
                    await wake.wait()
                    continue
                await send_frames(connection, frames)
                self.frames_sent += len(frames)
                progress.set()
        finally:
            session.closed = True
            progress.set()

    async def _watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        stall_s = self.settings.stall_timeout
        while True:
            await asyncio.sleep(min(1.0, stall_s / 4))
            for session in list(self.fanout.stalled(loop.time(), stall_s)):
                connection = self._connections.get(session.client_id)
                self.fanout.remove(session.client_id)
                self.slow_closes += 1
                log.warning("closing slow client", extra={"fields": {
                    "client": session.client_id, "pending": session.pending,
                    "missed": session.missed_total}})
                if connection is not None:
                    task = loop.create_task(self._close_slow(connection))
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)

    async def _close_slow(self, connection: ServerConnection) -> None:
        reason = f"slow_consumer: no progress for {self.settings.stall_timeout:g}s"
        try:
            await asyncio.wait_for(connection.close(CLOSE_SLOW_CONSUMER, reason), timeout=2.0)
        except (TimeoutError, ConnectionClosed):
            pass
        finally:
            # A client that never reads cannot take the close frame: drop the TCP connection.
            if connection.transport is not None and not connection.transport.is_closing():
                connection.transport.abort()

    # -- upstream --------------------------------------------------------------------------

    def _drain_sub(self) -> None:
        """Read every ready upstream message (up to a burst), route it, wake the senders.

        Runs as the loop's reader callback for the SUB socket's file descriptor. That
        descriptor is edge-triggered, so the socket is read until it would block; a burst
        limit keeps client senders running under a flood (the rest is read on the next
        loop iteration).
        """
        sub = self._sub
        if sub is None:
            return
        loop = asyncio.get_running_loop()
        fanout = self.fanout
        now = loop.time()
        events: list[LiveEvent] = []
        peers = self._peers
        more = True
        # The burst counts events: a v2 message carries a whole commit group.
        while len(events) < _SUB_BURST:
            try:
                frames = sub.recv_multipart(_NOBLOCK)
            except zmq.Again:
                more = False
                break
            try:
                events += decode_live_events(frames)
            except WireError:
                self.bad_frames += 1
        woken = fanout.on_events(events, now)
        if not self.direct:  # each client's sender task writes
            for session in woken:
                peer = peers.get(session.client_id)
                if peer is not None:
                    self._wake(peer, now)
        else:
            coalescer = self._coalescer
            for session in woken:
                peer = peers.get(session.client_id)
                if peer is not None and coalescer.woken(session.client_id, session.pending, now):
                    self._write(peer, now)
            for client_id in coalescer.due(now, drained=not more):
                peer = peers.get(client_id)
                if peer is not None:  # else it left meanwhile
                    self._write(peer, now)
        if more:
            loop.call_soon(self._drain_sub)

    def _drain_monitor(self) -> None:
        """Track which middle PUB endpoints the SUB socket is connected to."""
        monitor = self._monitor
        if monitor is None:
            return
        for event in pending_events(monitor):
            endpoint = event["endpoint"].decode(errors="replace")
            connected = int(event["event"]) == _HANDSHAKE
            if self.upstreams.get(endpoint) != connected:
                log.info("middle connected" if connected else "middle disconnected",
                         extra={"fields": {"endpoint": endpoint}})
            self.upstreams[endpoint] = connected

    def set_endpoints(self, endpoints: list[str]) -> None:
        """Connect the SUB socket to added middles, disconnect it from removed ones."""
        sub = self._sub
        diff = diff_endpoints(self.endpoints, endpoints)
        if sub is not None:
            for endpoint in diff.added:
                sub.connect(endpoint)
            for endpoint in diff.removed:
                with contextlib.suppress(zmq.ZMQError):  # never connected: nothing to undo
                    sub.disconnect(endpoint)
        for endpoint in diff.removed:
            self.upstreams.pop(endpoint, None)
        self.endpoints = list(endpoints)
        log.info("middle PUB endpoints changed", extra={"fields": {
            "added": list(diff.added), "removed": list(diff.removed)}})

    async def _reload_endpoints(self) -> None:
        watched = self.endpoints_file
        if watched is None:
            return
        while True:
            await asyncio.sleep(self.settings.endpoints_reload_seconds)
            changed = watched.check()
            if changed is not None:
                self.set_endpoints(changed)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        context = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, settings.sub_rcvhwm)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        if self.curve_keys is not None:
            secure_client(sub, self.curve_keys)
        # Watch the SUB socket's connections (before connecting, to see every event):
        # the relay is ready only while at least one middle is reachable.
        monitor = sub.get_monitor_socket(_HANDSHAKE | _DISCONNECTED)
        self._monitor = monitor
        for endpoint in self.endpoints:
            sub.connect(endpoint)
        tasks: list[asyncio.Task[None]] = []
        try:
            self._server = await serve(
                self._handle, settings.host, settings.port,
                process_request=self._route,
                compression="deflate" if settings.compression else None,
                max_size=settings.max_frame_bytes,
                max_queue=4,
                close_timeout=2.0,
                open_timeout=10.0,
                create_connection=BatchingConnection,
                ssl=self.tls.context if self.tls is not None else None,
            )
            sockets = self._server.sockets
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
            loop = asyncio.get_running_loop()
            self._sub = sub
            loop.add_reader(sub.getsockopt(zmq.FD), self._drain_sub)
            loop.call_soon(self._drain_sub)  # messages that arrived before the reader was added
            loop.add_reader(monitor.getsockopt(zmq.FD), self._drain_monitor)
            loop.call_soon(self._drain_monitor)
            tasks.append(asyncio.create_task(self._watchdog()))
            if self.endpoints_file is not None:
                tasks.append(asyncio.create_task(self._reload_endpoints()))
            if self.tls is not None or self.deny_file is not None:
                tasks.append(asyncio.create_task(self._reload_security()))
            self._ready = True
            log.info("relay serving", extra={"fields": {
                "port": self.port, "path": LIVE_PATH,
                "middle_pub_endpoints": self.endpoints,
                "auth": self.secret is not None}})
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            stopper.cancel()
        finally:
            self._ready = False
            for task in tasks:
                task.cancel()
            if self._server is not None:
                # Clients are told 1001 "going away" so they reconnect elsewhere.
                self._server.close(close_connections=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._server.wait_closed(), timeout=5.0)
            if self._sub is not None:
                loop = asyncio.get_running_loop()
                loop.remove_reader(sub.getsockopt(zmq.FD))
                loop.remove_reader(monitor.getsockopt(zmq.FD))
            self._sub = None
            self._monitor = None
            sub.disable_monitor()
            monitor.close(linger=0)
            sub.close(linger=0)
            context.term()
            log.info("relay stopped")


def main(argv: Sequence[str]) -> int:
    """``iotpipe relay``: run until SIGTERM/SIGINT, then close clients with 1001 and exit 0."""
    lifecycle.catch_early()
    settings = parse_settings(RelaySettings, argv)
    setup_logging("relay", settings.log_level)
    secret: bytes | None = None
    if not settings.insecure_no_auth:
        try:
            secret = load_secret()
        except RuntimeError as exc:
            print(f"iotpipe relay: error: {exc}", file=sys.stderr)
            return 2
    try:
        # Not required: a relay without middles serves clients (who get nothing yet).
        endpoints, watched = resolve_endpoints(
            "--middle-pub-endpoints", settings.middle_pub_endpoints,
            "--middle-pub-endpoints-file", settings.middle_pub_endpoints_file, required=False)
    except EndpointsError as exc:
        print(f"iotpipe relay: error: {exc}", file=sys.stderr)
        return 2
    if not endpoints:
        log.warning("no middle PUB endpoints configured: clients will receive nothing")
    problem = check_security_settings(settings, "relay")
    if problem:
        print(f"iotpipe relay: error: {problem}", file=sys.stderr)
        return 2
    relay = RelayServer(settings, secret, endpoints, watched)
    REGISTRY.register(RelayCollector(relay))
    if watched is not None:
        REGISTRY.register(EndpointsCollector({"pub": watched}))
    try:
        observability = ObservabilityServer(settings.host, settings.metrics_port,
                                            ready=lambda: relay.ready).start()
    except PortInUse as exc:
        print(f"iotpipe relay: error: {exc}", file=sys.stderr)
        return 1

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if lifecycle.requested():
            return  # stopped while starting: nothing was served yet
        await relay.run(stop)

    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(_run())
        else:
            uvloop.run(_run())
    except OSError as exc:
        log.error("relay failed", extra={"fields": {"error": str(exc)}})
        if exc.errno == errno.EADDRINUSE:
            print(f"iotpipe relay: error: port {settings.port} on {settings.host} is in use",
                  file=sys.stderr)
        return 1
    finally:
        observability.stop()
    return 0

