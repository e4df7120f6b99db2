"""``iotpipe ingest``: the device WebSocket server (a thin I/O shell) plus its forwarder.

Per connection: the handshake is authenticated in ``process_request`` (HTTP 401 naming
the reason otherwise); each received frame goes through the sans-I/O ``DeviceSession``;
good messages join the current commit group (``_Committer``: the readings of every frame
that arrives while an append is in flight become ONE ``AsyncQueue`` append, so one
fdatasync and one future serve all of them). Replies go out in order through a
per-connection sender task, and an ack only once its group is durable. The read loop runs
ahead of the sender by at most ``OUTBOX_FRAMES`` frames: while appends wait for queue space
the connection stops being read (backpressure), and after ``busy_wait`` seconds the
waiting frames are answered ``busy``.

Processes: with ``--processes N`` a parent starts N children on one port (SO_REUSEPORT).
Child ``i`` uses queue dir ``<data_dir>/p<i>`` and node id ``<node_id>-p<i>~<incarnation>``
(see identity.py). With N = 1 the single process is ``p0`` itself (same layout, so
``iotpipe drain`` always finds ``p<i>`` directories). The parent forwards SIGTERM and
SIGINT and restarts a child that dies unexpectedly. Children die with the parent (Linux
``PR_SET_PDEATHSIG``), so a SIGKILLed parent leaves no process holding the port or a queue.

One health and metrics endpoint per pod: with N > 1 the parent serves ``/metrics``,
``/healthz`` and ``/readyz`` on ``metrics_port``; each child serves its own on a private
loopback port that it reports to the parent through a pipe. The parent's ``/metrics``
sums the children's ``iotpipe_*`` samples (connections, counters, queue depth: pod
totals; see ``observability.merge_scrapes``) and its ``/readyz`` fails while any child is
dead, restarting, or not ready itself.

Middle endpoints: ``--middle-endpoints-file`` is re-read every
``--endpoints-reload-seconds``; a changed list goes to the running forwarders (added
middles connected, removed ones disconnected, unacked batches resent in order), no
restart.

Lowered ``--processes``: process 0 forwards every queue ``p<i>`` with ``i >= N`` that it
finds under ``data_dir`` to the middle tier under that queue's own node identity (the
middle deduplicates what the old process already sent), reports them in
``iotpipe_ingest_retired_queues``, and deletes each directory once it is empty.

SIGTERM drains: /readyz turns 503, the listener closes, devices are closed with 1001 at
``drain_close_rate`` per second, the forwarder empties the queue to the middle tier, and
the process exits 0 -- or 1 if ``drain_timeout`` ran out (the queue stays on disk, intact).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import http
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import Field
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from iotpipe import lifecycle
from iotpipe.auth import DEVICE_AUDIENCE, AuthError, bearer_token, load_secret, verify_identity
from iotpipe.curve import load_keys
from iotpipe.denylist import CLOSE_REVOKED, DenyList, DenyListFile
from iotpipe.endpoints import (
    EndpointsCollector,
    EndpointsError,
    EndpointsFile,
    resolve_endpoints,
)
from iotpipe.ingest.drain import QueueDrainer, process_dirs, remove_leftovers
from iotpipe.ingest.forwarder import CONSUMER, Forwarder
from iotpipe.ingest.identity import queue_node_id
from iotpipe.ingest.metrics import IngestCollector, IngestCounters
from iotpipe.observability import (
    ObservabilityServer,
    PortInUse,
    QueueDepthCollector,
    merge_scrapes,
    setup_logging,
)
from iotpipe.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    DeviceSession,
    FrameLimits,
    TokenBucket,
    encode_ack_frame,
    encode_busy_frame,
    encode_error_frame,
)
from iotpipe.queue import AsyncQueue, PersistentQueue, QueueError, QueueFull
from iotpipe.security import check_security_settings
from iotpipe.settings import (
    CommaList,
    EdgeSecuritySettings,
    Internal,
    ServerSettings,
    parse_settings,
    tier_config,
)
from iotpipe.tlsconfig import ReloadingTLS

__all__ = ["IngestServer", "IngestSettings", "main"]

log = logging.getLogger("iotpipe.ingest")
PATH = "/v1/ingest"
PROCESS_INDEX_ENV = "IOTPIPE_INGEST_PROCESS_INDEX"
PARENT_PID_ENV = "IOTPIPE_INGEST_PARENT_PID"
REPORT_FD_ENV = "IOTPIPE_INGEST_REPORT_FD"
# How often process 0 looks again for retired queues it could not open (still locked).
RETIRED_SCAN_SECONDS = 10.0


class IngestSettings(EdgeSecuritySettings, ServerSettings):
    """Device WebSocket server: authenticates devices, stores each message durably, acks it,
    and forwards the queue to the middle tier."""

    model_config = tier_config("iotpipe ingest", "IOTPIPE_INGEST_")

    port: int = Field(8080, ge=0, le=65535, description="WebSocket port (path /v1/ingest)")
    metrics_port: int = Field(9100, ge=0, le=65535,
                              description="port of /metrics, /healthz and /readyz of the pod "
                                          "(covers every process)")
    data_dir: Path = Field(Path("/var/lib/iotpipe/queue"),
                           description="queue directory (process i uses <data_dir>/p<i>)")
    queue_bytes: int = Field(1 << 30, gt=0, description="queue capacity per process in bytes")
    processes: int = Field(1, ge=1, le=256, description="processes on one port (SO_REUSEPORT)")
    node_id: str = Field(default_factory=socket.gethostname,
                         description="node identity (process i is NODE_ID-pI)")
    middle_endpoints: CommaList = Field(default_factory=list,
                                        description="middle ROUTER endpoints, comma separated")
    middle_endpoints_file: str = Field(
        "", description="file listing the middle ROUTER endpoints, one per line (key 'router' "
                        "of the endpoints ConfigMap), re-read while running; wins over "
                        "--middle-endpoints when usable")
    endpoints_reload_seconds: float = Field(2.0, gt=0,
                                            description="seconds between endpoints file checks")
    insecure_no_auth: bool = Field(False, description="no tokens; device from ?device= or the "
                                   "message's 'device' field (local demos only)")
    rate_limit: float = Field(1000.0, ge=0, description="messages/s per device (0 = unlimited)")
    rate_burst: float = Field(0.0, ge=0, description="token bucket size (0 = 2 x rate_limit)")
    flood_limit: int = Field(20, ge=1, description="consecutive rate-limited frames before the "
                             "device is closed with 1008")
    max_frame_bytes: int = Field(65536, ge=128, description="largest frame (bigger -> close 1009)")
    max_batch: int = Field(1000, ge=1, description="messages per batch frame")
    busy_wait: float = Field(1.0, ge=0, description="seconds to wait for queue space before "
                             "answering busy")
    busy_retry_ms: int = Field(1000, ge=1, description="retry hint sent with busy")
    compression: bool = Field(False, description="permessage-deflate (costs ~35 KB/connection)")
    open_timeout: float = Field(10.0, gt=0, description="seconds to finish the handshake")
    ping_interval: float = Field(20.0, gt=0, description="seconds between keepalive pings")
    ping_timeout: float = Field(20.0, gt=0, description="seconds to wait for a pong")
    drain_timeout: float = Field(60.0, gt=0, description="seconds to empty the queue on SIGTERM")
    drain_close_rate: float = Field(500.0, gt=0, description="device closes per second on drain")
    forward_batch: int = Field(512, ge=1, description="records per batch to the middle tier")
    forward_window: int = Field(8, ge=1, description="batches in flight to the middle tier")
    forward_ack_timeout: float = Field(5.0, gt=0, description="seconds before failover/resend")
    # Set by the parent of --processes N for each child; not user options.
    process_index: int = Field(-1, ge=-1, description=Internal)
    parent_pid: int = Field(0, ge=0, description=Internal)
    report_fd: int = Field(-1, ge=-1, description=Internal)


class _DeviceBuckets:
    """One token bucket per device id, shared by that device's connections in this process."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst if burst > 0 else max(1.0, 2 * rate)
        self._buckets: dict[str, tuple[TokenBucket, int]] = {}

    def acquire(self, device: str | None, now: float) -> TokenBucket | None:
        if self.rate <= 0:
            return None
        if device is None:  # insecure mode, device named per message: one per connection
            return TokenBucket(self.rate, self.burst, now)
        bucket, users = self._buckets.get(device) or (TokenBucket(self.rate, self.burst, now), 0)
        self._buckets[device] = (bucket, users + 1)
        return bucket

    def release(self, device: str | None) -> None:
        if device is None:
            return
        key = device
        entry = self._buckets.get(key)
        if entry is None:
            return
        bucket, users = entry
        if users <= 1:
            del self._buckets[key]
        else:
            self._buckets[key] = (bucket, users - 1)


# What a connection's sender task gets: a reply frame, (durable-future, ids) for an ack,
# or None to stop.
# A frame's durable append, its message ids and when it was read (for the ack latency).
_Reply = bytes | tuple["asyncio.Future[None]", list[str | int], float] | None
OUTBOX_FRAMES = 16


class _Committer:
    """Collects the readings of every frame that arrives while a queue append is in
    flight and appends them as ONE batch: one future per group instead of one per frame.
    ``submit`` returns the group's future; it fails with ``QueueFull`` (after waiting up to
    ``busy_wait`` for space) or ``QueueError`` for every frame of the group."""

    def __init__(self, aqueue: AsyncQueue, busy_wait: float) -> None:
        self._aqueue = aqueue
        self._busy_wait = busy_wait
        self._loop = asyncio.get_running_loop()
        self._readings: list[bytes] = []
        self._future: asyncio.Future[None] | None = None
        self._writing = False

    def submit(self, readings: list[bytes]) -> asyncio.Future[None]:
        future = self._future
        if future is None:
            future = self._future = self._loop.create_future()
        self._readings.extend(readings)
        if not self._writing:
            self._start()
        return future

    def _start(self) -> None:
        readings, future = self._readings, self._future
        assert future is not None
        self._readings, self._future = [], None
        self._writing = True
        self._loop.create_task(self._write(readings, future))

    async def _write(self, readings: list[bytes], future: asyncio.Future[None]) -> None:
        try:
            await self._aqueue.append(readings, timeout=self._busy_wait)
        except Exception as exc:  # QueueFull / QueueError go to every frame of the group
            future.set_exception(exc)
            future.exception()  # retrieved here: a group whose devices left is not an error
        else:
            future.set_result(None)
        finally:
            self._writing = False
            if self._readings:
                self._start()


class IngestServer:
    """One ingest process: WebSocket server + queue + forwarder thread."""

    def __init__(self, settings: IngestSettings, index: int,
                 endpoints: Sequence[str] | None = None) -> None:
        self.settings = settings
        self.index = index
        self.endpoints = list(endpoints if endpoints is not None else settings.middle_endpoints)
        # Queues p<i> (i >= processes) left by processes this pod no longer runs.
        self.retired: dict[str, QueueDrainer] = {}
        self.retired_removed = 0
        self._retired_problems: set[str] = set()
        # Completed with the queue's incarnation once the queue is open (see identity.py).
        self.node = f"{settings.node_id}-p{index}"
        self.queue_dir = settings.data_dir / f"p{index}"
        self.secret: bytes | None = None if settings.insecure_no_auth else load_secret()
        self.curve_keys = (load_keys(settings.curve_keys_dir, "ingest")
                           if settings.curve_keys_dir else None)
        self.tls = (ReloadingTLS(settings.tls_cert, settings.tls_key)
                    if settings.tls_cert else None)
        self.deny_file = DenyListFile(settings.deny_list_file) if settings.deny_list_file else None
        self.deny = self.deny_file.current if self.deny_file else DenyList()
        self._revoking: set[asyncio.Task[None]] = set()
        self.limits = FrameLimits(max_batch=settings.max_batch)
        self.draining = False
        self.buckets = _DeviceBuckets(settings.rate_limit, settings.rate_burst)
        self.queue: PersistentQueue | None = None
        self.aqueue: AsyncQueue | None = None
        self.committer: _Committer | None = None
        self.forwarder: Forwarder | None = None
        self.ws_server: Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.counters = IngestCounters()
        self._port = 0

    # -- readiness -------------------------------------------------------------------

    def ready(self) -> bool:
        fwd = self.forwarder
        return (not self.draining and self.ws_server is not None and fwd is not None
                and fwd.error is None
                and all(d.forwarder.error is None for d in list(self.retired.values())))

    # -- endpoints and retired queues ------------------------------------------------

    def set_endpoints(self, endpoints: Sequence[str]) -> None:
        """A new middle endpoint list for every forwarder of this process."""
        self.endpoints = list(endpoints)
        if self.forwarder is not None:
            self.forwarder.set_endpoints(endpoints)
        for drainer in list(self.retired.values()):
            drainer.forwarder.set_endpoints(endpoints)

    def start_retired(self) -> None:
        """Forward the queues of processes this pod no longer runs (only process 0 does)."""
        s = self.settings
        remove_leftovers(s.data_dir)
        for index, path in process_dirs(s.data_dir):
            if index < s.processes or path.name in self.retired:
                continue
            try:
                self.retired[path.name] = QueueDrainer(path, index, s.node_id, self.endpoints,
                                                       s.queue_bytes, self.curve_keys)
            except QueueError as exc:  # e.g. still locked: tried again later, never lost
                if path.name not in self._retired_problems:
                    log.error("retired queue cannot be opened yet", extra={"fields": {
                        "path": str(path), "error": str(exc)}})
                self._retired_problems.add(path.name)
            else:
                self._retired_problems.discard(path.name)

    def reap_retired(self) -> int:
        """Close and delete the retired queues that are empty now; how many were removed."""
        removed = 0
        for name, drainer in list(self.retired.items()):
            if drainer.is_empty():
                del self.retired[name]
                if drainer.close(remove_if_empty=True):
                    removed += 1
        self.retired_removed += removed
        return removed

    # -- handshake -------------------------------------------------------------------

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path != PATH:
            return connection.respond(http.HTTPStatus.NOT_FOUND, f"no such path; use {PATH}\n")
        if self.draining:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        token_id: str | None = None
        if self.secret is None:
            device = parse_qs(url.query).get("device", [None])[0] or None
        else:
            try:
                token = bearer_token(request.headers.get("Authorization"))
                identity = verify_identity(self.secret, token, DEVICE_AUDIENCE)
            except AuthError as exc:
                self.counters.auth_failures[exc.reason] += 1
                response = connection.respond(http.HTTPStatus.UNAUTHORIZED, f"{exc}\n")
                response.headers["WWW-Authenticate"] = f'Bearer error="invalid_token", ' \
                    f'error_description="{exc.reason}"'
                return response
            device, token_id = identity.subject, identity.token_id
        refusal = self.deny.refusal("device", device, token_id)
        if refusal is not None:
            self.counters.auth_failures["revoked"] += 1
            return connection.respond(http.HTTPStatus.FORBIDDEN,
                                      f"revoked: this {refusal} is on the deny list\n")
        connection.device_id = device  # type: ignore[attr-defined]
        connection.token_id = token_id  # type: ignore[attr-defined]
        return None

    # -- reloads (TLS certificate, deny list) ----------------------------------------

    def reload_tls(self) -> None:
        if self.tls is not None:
            self.tls.check()

    def reload_deny_list(self) -> int:
        """Re-read the deny list; close open connections it now refuses (how many)."""
        if self.deny_file is None:
            return 0
        fresh = self.deny_file.check()
        if fresh is None:
            return 0
        self.deny = fresh
        if self.ws_server is None:
            return 0
        closed = 0
        for conn in list(self.ws_server.connections):
            reason = fresh.refusal("device", getattr(conn, "device_id", None),
                                   getattr(conn, "token_id", None))
            if reason is None:
                continue
            self.counters.closes[str(CLOSE_REVOKED)] += 1
            task = asyncio.get_running_loop().create_task(
                conn.close(CLOSE_REVOKED, f"revoked: {reason}"))
            self._revoking.add(task)
            task.add_done_callback(self._revoking.discard)
            closed += 1
        if closed:
            log.info("revoked connections closed", extra={"fields": {"connections": closed}})
        return closed

    # -- one device ------------------------------------------------------------------

    async def handle(self, ws: ServerConnection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        loop = asyncio.get_running_loop()
        device: str | None = getattr(ws, "device_id", None)
        session = DeviceSession(device, bucket=self.buckets.acquire(device, loop.time()),
                                limits=self.limits, flood_limit=self.settings.flood_limit)
        outbox: asyncio.Queue[_Reply] = asyncio.Queue(maxsize=OUTBOX_FRAMES)
        sender = asyncio.create_task(self._sender(ws, outbox))
        counters = self.counters
        counters.connections += 1
        try:
            await self._read_loop(ws, session, outbox)
        except ConnectionClosed:
            pass
        finally:
            counters.connections -= 1
            self.buckets.release(device)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sender
            self._handlers.discard(task)

    async def _read_loop(self, ws: ServerConnection, session: DeviceSession,
                         outbox: asyncio.Queue[_Reply]) -> None:
        assert self.committer is not None
        loop = asyncio.get_running_loop()
        committer = self.committer
        counters = self.counters
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
                # outbox is full, which is the backpressure: a device whose frames wait for
                # queue space is not read beyond OUTBOX_FRAMES frames.
                pending = (committer.submit(outcome.readings), outcome.ids, read_at)
                if outbox.full():
                    await outbox.put(pending)
                else:  # the common case, without a coroutine per frame
                    outbox.put_nowait(pending)
            if outcome.close is not None:
                await self._close_after_flush(ws, outbox, *outcome.close)
                return

    async def _close_after_flush(self, ws: ServerConnection, outbox: asyncio.Queue[_Reply],
                                 code: int, reason: str) -> None:
        self.counters.closes[str(code)] += 1
        await outbox.put(None)  # the sender sends what is queued, then stops
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(outbox.join(), timeout=self.settings.busy_wait + 5.0)
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
        counters = self.counters
        busy_retry_ms = self.settings.busy_retry_ms
        loop = asyncio.get_running_loop()
        closed = False
        while True:
            item = await outbox.get()
            try:
                if item is None:
                    return
                if isinstance(item, tuple):
                    durable, ids, read_at = item
                    try:
                        await durable
                    except QueueFull:
                        counters.busy += len(ids)
                        frame = encode_busy_frame(ids, busy_retry_ms)
                    except Exception as exc:  # QueueError, or a bug: never ack, close 1011
                        log.error("queue append failed", extra={"fields": {"error": str(exc)}})
                        counters.rejected["internal"] += len(ids)
                        frame = encode_error_frame("internal", list(ids),
                                                   "the server cannot store messages")
                        if not closed:
                            with contextlib.suppress(ConnectionClosed):
                                await ws.send(frame, text=True)
                        counters.closes[str(CLOSE_INTERNAL)] += 1
                        closed = True
                        asyncio.get_running_loop().create_task(
                            ws.close(CLOSE_INTERNAL, "queue failure"))
                        continue
                    else:
                        counters.accepted += len(ids)
                        counters.ack_frames += 1
                        counters.observe_frame(len(ids))
                        counters.observe_ack(loop.time() - read_at)
                        frame = encode_ack_frame(ids)
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

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.queue = PersistentQueue.open(self.queue_dir, capacity_bytes=s.queue_bytes,
                                          consumers=(CONSUMER,))
        self.node = queue_node_id(self.queue_dir, self.node)
        self.aqueue = AsyncQueue(self.queue)
        self.committer = _Committer(self.aqueue, s.busy_wait)
        self.forwarder = Forwarder(
            self.queue, self.node, self.endpoints, batch_records=s.forward_batch,
            window=s.forward_window, ack_timeout=s.forward_ack_timeout,
            curve_keys=self.curve_keys,
        ).start()
        self.ws_server = await serve(
            self.handle, s.host, s.port,
            process_request=self.process_request,
            compression="deflate" if s.compression else None,
            max_size=s.max_frame_bytes,
            open_timeout=s.open_timeout,
            ping_interval=s.ping_interval,
            ping_timeout=s.ping_timeout,
            close_timeout=5,
            reuse_port=s.processes > 1,
            ssl=self.tls.context if self.tls is not None else None,
        )
        self._port = int(self.ws_server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        """The bound WebSocket port (known once started; kept after the listener closes)."""
        return self._port

    async def drain(self) -> bool:
        """Stop accepting, close devices at a bounded rate, empty the queue. True if empty."""
        s = self.settings
        deadline = time.monotonic() + s.drain_timeout
        self.draining = True
        assert self.ws_server is not None and self.forwarder is not None
        self.ws_server.close(close_connections=False)
        log.info("draining", extra={"fields": {"connections": len(self.ws_server.connections)}})
        interval = 1.0 / s.drain_close_rate
        closing = []
        # Half the drain time at most goes to spreading the closes; the rest at once.
        spread_until = time.monotonic() + s.drain_timeout / 2
        for conn in list(self.ws_server.connections):
            closing.append(asyncio.create_task(conn.close(CLOSE_GOING_AWAY, "going away")))
            self.counters.closes[str(CLOSE_GOING_AWAY)] += 1
            if time.monotonic() < spread_until:
                await asyncio.sleep(interval)
        if closing:
            await asyncio.wait(closing, timeout=max(0.1, deadline - time.monotonic()))
        if self._handlers:  # appends in progress finish (and are acked) before we count
            await asyncio.wait(list(self._handlers),
                               timeout=max(0.1, deadline - time.monotonic()))
        forwarder = self.forwarder
        empty = await asyncio.to_thread(forwarder.wait_empty,
                                        max(0.0, deadline - time.monotonic()))
        # Retired queues too: whatever is left of them stays on disk for the next start
        # (or a drain Job), intact.
        while self.retired and time.monotonic() < deadline:
            await asyncio.to_thread(self.reap_retired)
            if self.retired:
                await asyncio.sleep(0.05)
        empty = empty and not self.retired
        depth = self.queue.depth() if self.queue else None
        log.info("drain finished", extra={"fields": {
            "empty": empty, "depth": depth, "retired_left": sorted(self.retired)}})
        return empty

    async def aclose(self) -> None:
        for name, drainer in list(self.retired.items()):
            del self.retired[name]
            await asyncio.to_thread(drainer.close, True)
        if self.ws_server is not None:
            self.ws_server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.ws_server.wait_closed(), 5)
        if self.forwarder is not None:
            await asyncio.to_thread(self.forwarder.stop)
        if self.aqueue is not None:
            await self.aqueue.aclose()
        if self.queue is not None:
            self.queue.close()


def _queue_source(server: IngestServer) -> tuple[int, int, int]:
    q = server.queue
    if q is None:
        return (0, 0, 0)
    depth = q.depth()
    return (depth.records, depth.bytes, q.capacity_bytes)


def _retired_source(server: IngestServer) -> tuple[int, int, int]:
    depths = [d.depth() for d in list(server.retired.values())]
    return (sum(d[0] for d in depths), sum(d[1] for d in depths), sum(d[2] for d in depths))


class _RetiredCollector:
    """The retired queues (``p<i>`` of processes this pod no longer runs) being drained."""

    def __init__(self, server: IngestServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        drainers = list(self._server.retired.values())
        yield GaugeMetricFamily("iotpipe_ingest_retired_queues",
                                "Queues of processes no longer run, being drained",
                                value=len(drainers))
        records = GaugeMetricFamily("iotpipe_ingest_retired_queue_records",
                                    "Records left in the retired queues being drained")
        records.add_metric([], sum(d.depth()[0] for d in drainers))
        yield records
        yield CounterMetricFamily("iotpipe_ingest_retired_queues_removed",
                                  "Retired queues drained and deleted",
                                  value=self._server.retired_removed)


async def run_process(settings: IngestSettings, index: int,
                      endpoints: Sequence[str] | None = None,
                      watched: EndpointsFile | None = None) -> int:
    """Run one ingest process until SIGTERM/SIGINT; returns the exit code."""
    server = IngestServer(settings, index, endpoints)
    # "retired": queues of processes this pod no longer runs, until drained and deleted
    # (so the depth covers everything on the pod's volume).
    REGISTRY.register(QueueDepthCollector("ingest", {
        "ingest": lambda: _queue_source(server), "retired": lambda: _retired_source(server)}))
    REGISTRY.register(IngestCollector(
        server.counters, lambda: [server.forwarder.core] if server.forwarder else []))
    REGISTRY.register(_RetiredCollector(server))
    if watched is not None:
        REGISTRY.register(EndpointsCollector({"router": watched}))
    child = settings.process_index >= 0
    # A child of a multi-process pod serves on a private loopback port; the parent serves
    # the pod's port and aggregates (the child tells it the port through a pipe).
    try:
        obs = ObservabilityServer("127.0.0.1" if child else settings.host,
                                  0 if child else settings.metrics_port,
                                  ready=server.ready).start()
    except PortInUse as exc:
        print(f"iotpipe ingest: error: {exc}", file=sys.stderr)
        return 1
    if child and settings.report_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(settings.report_fd, f"{obs.port}\n".encode())
            os.close(settings.report_fd)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if lifecycle.requested():
        return 0  # stopped while starting: nothing was opened yet
    try:
        try:
            await server.start()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            print(f"iotpipe ingest: error: port {settings.port} on {settings.host} is in use",
                  file=sys.stderr)
            return 1
        if index == 0:
            await asyncio.to_thread(server.start_retired)
        log.info("ingest listening", extra={"fields": {
            "node": server.node, "port": server.port, "metrics_port": obs.port,
            "queue": str(server.queue_dir), "middle": server.endpoints,
            "retired_queues": sorted(server.retired)}})
        next_check = time.monotonic() + settings.endpoints_reload_seconds
        next_retired_scan = time.monotonic() + RETIRED_SCAN_SECONDS
        next_tls = time.monotonic() + settings.tls_reload_seconds
        next_deny = time.monotonic() + settings.deny_list_reload_seconds
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(),
                                       min(0.5, settings.endpoints_reload_seconds,
                                           settings.deny_list_reload_seconds))
            if time.monotonic() >= next_tls:
                next_tls = time.monotonic() + settings.tls_reload_seconds
                server.reload_tls()
            if time.monotonic() >= next_deny:
                next_deny = time.monotonic() + settings.deny_list_reload_seconds
                server.reload_deny_list()
            if watched is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + settings.endpoints_reload_seconds
                changed = watched.check()
                if changed is not None:
                    server.set_endpoints(changed)
            if server.retired:
                await asyncio.to_thread(server.reap_retired)
            if index == 0 and time.monotonic() >= next_retired_scan:
                next_retired_scan = time.monotonic() + RETIRED_SCAN_SECONDS
                await asyncio.to_thread(server.start_retired)
            if server.forwarder is not None and server.forwarder.error is not None:
                # Nothing would leave the queue any more: exit so the supervisor (or
                # Kubernetes) restarts us; the queue is durable, nothing acked is lost.
                log.error("forwarder failed; exiting", extra={"fields": {
                    "error": repr(server.forwarder.error)}})
                return 1
        empty = await server.drain()
        return 0 if empty else 1
    finally:
        await server.aclose()
        obs.stop()


def _raise_nofile() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: one descriptor per device connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies.

    Set by the child itself at startup; the parent may have died before that (the flag
    only covers deaths after it is set), so the parent pid is checked afterwards: a child
    re-parented already exits at once. SIGKILL rather than SIGTERM: the pod's parent is
    gone abnormally, a new one must find the port and the queues free, and nothing acked
    depends on a graceful exit (the queues are durable).
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed", extra={"fields": {
            "errno": ctypes.get_errno()}})
    if os.getppid() != parent_pid:
        log.error("parent process already gone; exiting", extra={"fields": {
            "parent_pid": parent_pid}})
        os._exit(1)


class _Child:
    """One child process as the parent sees it: the process and its private metrics port."""

    def __init__(self, index: int, argv: Sequence[str]) -> None:
        self.index = index
        read_fd, write_fd = os.pipe()
        env = {**os.environ, PROCESS_INDEX_ENV: str(index), PARENT_PID_ENV: str(os.getpid()),
               REPORT_FD_ENV: str(write_fd)}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iotpipe.cli", "ingest", *argv], env=env,
                pass_fds=(write_fd,))
        finally:
            os.close(write_fd)
        os.set_blocking(read_fd, False)
        self._read_fd: int | None = read_fd
        self._buffer = b""
        self.metrics_port: int | None = None

    def poll_port(self) -> int | None:
        """Read the child's report pipe (non-blocking): its metrics port once known."""
        if self._read_fd is not None:
            try:
                chunk = os.read(self._read_fd, 64)
            except BlockingIOError:
                chunk = None
            if chunk is not None:
                self._buffer += chunk
                if b"\n" in self._buffer or not chunk:  # a line, or EOF (the child died)
                    line = self._buffer.split(b"\n", 1)[0].strip()
                    self.metrics_port = int(line) if line.isdigit() else None
                    self.close()
        return self.metrics_port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
            self._read_fd = None


# Straight to the child: an HTTP(S)_PROXY in the pod's environment must not apply.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_get(port: int, path: str, timeout: float) -> tuple[int, str]:
    try:
        with _LOCAL.open(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), ""
    except OSError:
        return 0, ""


class PodView:
    """The pod's one health and metrics endpoint, served by the parent process.

    Asks every child's private endpoint at request time, all children at once (so a scrape
    is as fresh as a single process's, and one hung child costs one timeout, not N). Read
    from the observability thread while the main thread replaces children, hence the
    copies of ``children``.
    """

    def __init__(self, processes: int, probe_timeout: float = 0.8,
                 scrape_timeout: float = 3.0) -> None:
        self.processes = processes
        # Below Kubernetes' default probe timeout (1 s): a hung child makes the pod's
        # answer "not ready", not a probe timeout.
        self.probe_timeout = probe_timeout
        self.scrape_timeout = scrape_timeout
        self.children: dict[int, _Child] = {}
        self.restarts = 0
        self._pool = ThreadPoolExecutor(max_workers=max(2, 2 * processes),
                                        thread_name_prefix="pod-view")

    def _ports(self) -> dict[int, int | None]:
        return {i: (c.metrics_port if c.alive() else None)
                for i, c in list(self.children.items())}

    def _ask(self, ports: dict[int, int], path: str, timeout: float
             ) -> dict[int, tuple[int, str]]:
        futures = {i: self._pool.submit(_http_get, port, path, timeout)
                   for i, port in ports.items()}
        return {i: future.result() for i, future in futures.items()}

    def ready(self) -> bool:
        ports = self._ports()
        if len(ports) < self.processes or any(p is None for p in ports.values()):
            return False  # a child is dead, restarting, or not serving yet
        answers = self._ask({i: p for i, p in ports.items() if p is not None}, "/readyz",
                            self.probe_timeout)
        return all(status == 200 for status, _ in answers.values())

    def collect(self) -> Iterator[Metric]:
        ports = {i: p for i, p in self._ports().items() if p is not None}
        answers = self._ask(ports, "/metrics", self.scrape_timeout)
        scrapes = {str(i): text for i, (status, text) in sorted(answers.items())
                   if status == 200}
        yield from merge_scrapes(scrapes)
        yield GaugeMetricFamily("iotpipe_ingest_processes", "Ingest processes configured",
                                value=self.processes)
        yield GaugeMetricFamily("iotpipe_ingest_processes_scraped",
                                "Ingest processes whose metrics this scrape includes",
                                value=len(scrapes))
        yield CounterMetricFamily("iotpipe_ingest_process_restarts",
                                  "Child processes restarted after dying", value=self.restarts)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _run_parent(settings: IngestSettings, argv: Sequence[str]) -> int:
    """Start N children on one port; serve the pod's endpoint; forward signals; restart
    children that die."""
    view = PodView(settings.processes)
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in list(view.children.values()):
            if child.alive():
                child.proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if lifecycle.requested():
        return 0  # stopped while starting: no child was started
    registry = CollectorRegistry(auto_describe=False)
    registry.register(view)
    try:
        obs = ObservabilityServer(settings.host, settings.metrics_port, ready=view.ready,
                                  registry=registry).start()
    except PortInUse as exc:
        print(f"iotpipe ingest: error: {exc}", file=sys.stderr)
        return 1
    log.info("ingest pod endpoint", extra={"fields": {
        "metrics_port": obs.port, "processes": settings.processes}})
    try:
        for i in range(settings.processes):
            view.children[i] = _Child(i, argv)
        codes: dict[int, int] = {}
        while len(codes) < len(view.children):
            time.sleep(0.1)
            for i, child in list(view.children.items()):
                child.poll_port()
                if i in codes:
                    continue
                rc = child.proc.poll()
                if rc is None:
                    continue
                child.close()
                if stopping:
                    codes[i] = rc
                else:
                    log.error("ingest child died; restarting", extra={"fields": {
                        "index": i, "rc": rc}})
                    time.sleep(0.5)
                    view.restarts += 1
                    view.children[i] = _Child(i, argv)
        return max(codes.values(), default=0)
    finally:
        obs.stop()
        view.close()
        for child in view.children.values():
            child.close()


def main(argv: Sequence[str]) -> int:
    lifecycle.catch_early()  # a stop while the queue opens counts (see iotpipe.lifecycle)
    settings = parse_settings(IngestSettings, argv)
    setup_logging("ingest", settings.log_level)
    index = settings.process_index  # set by the parent through IOTPIPE_INGEST_PROCESS_INDEX
    if index >= 0 and settings.parent_pid:
        die_with_parent(settings.parent_pid)
    # websockets logs every connection open/close at INFO: far too much at C10K.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        endpoints, watched = resolve_endpoints(
            "--middle-endpoints", settings.middle_endpoints,
            "--middle-endpoints-file", settings.middle_endpoints_file)
    except EndpointsError as exc:
        print(f"iotpipe ingest: error: {exc}", file=sys.stderr)
        return 2
    if not settings.insecure_no_auth:
        try:
            load_secret()
        except RuntimeError as exc:
            print(f"iotpipe ingest: error: {exc} (or pass --insecure-no-auth for local demos)",
                  file=sys.stderr)
            return 2
    problem = check_security_settings(settings, "ingest")
    if problem:
        print(f"iotpipe ingest: error: {problem}", file=sys.stderr)
        return 2
    if index < 0 and settings.processes > 1:
        return _run_parent(settings, argv)
    _install_uvloop()
    _raise_nofile()
    return asyncio.run(run_process(settings, max(index, 0), endpoints, watched))
