"""``iotpipe ingest``: one ingest process -- the device WebSocket front, the durable queue
and the forwarder to the middle tier -- and the command's entry point.

The process wires the parts; each lives in its own module:

- ``core/``: the sans-I/O device protocol (``DeviceSession`` judges every frame), rate
  limits and the forwarder's windowed-batch core;
- ``front.py`` (picows, the default) and ``wsfront.py`` (websockets, for
  ``--compression``): the WebSocket cores. Both share one handshake decision
  (``IngestServer.admit``: HTTP 401/403/404/503 naming the reason) and one commit path: good
  messages join the open commit group (``AsyncQueue.submit``: the readings of every frame
  that arrives while an append is in flight become ONE batch, one fdatasync), and replies
  go out in order per connection, an ack only once its group is durable (``acks.py``);
- ``forwarder.py``: sends the queue to the middle tier, on the event loop;
- ``pod.py``: the parent of ``--processes N`` (N children on one port, one pod endpoint);
- ``drain.py``: retired queues and ``iotpipe drain``.

Processes: child ``i`` uses queue dir ``<data_dir>/p<i>`` and node id
``<node_id>-p<i>~<incarnation>`` (see identity.py). With N = 1 the single process is ``p0``
itself (same layout, so ``iotpipe drain`` always finds ``p<i>`` directories).

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
import errno
import gc
import http
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

from prometheus_client import REGISTRY

from iotpipe import lifecycle
from iotpipe.auth import DEVICE_AUDIENCE, AuthError, bearer_token, load_secret, verify_identity
from iotpipe.curve import load_keys
from iotpipe.denylist import CLOSE_REVOKED, DenyList, DenyListFile, reload_security
from iotpipe.endpoints import (
    EndpointsCollector,
    EndpointsError,
    EndpointsFile,
)
from iotpipe.ingest.core import CLOSE_GOING_AWAY, DeviceBuckets, FrameLimits
from iotpipe.ingest.drain import QueueDrainer, process_dirs, remove_leftovers
from iotpipe.ingest.forwarder import CONSUMER, Forwarder
from iotpipe.ingest.front import Admitted, PicowsFront, Refusal
from iotpipe.ingest.identity import queue_node_id
from iotpipe.ingest.metrics import (
    IngestCollector,
    IngestCounters,
    RetiredCollector,
    queue_depth,
    retired_depth,
)
from iotpipe.ingest.pod import die_with_parent, run_parent
from iotpipe.ingest.settings import IngestSettings, listen_backlog, ws_core
from iotpipe.ingest.wsfront import WebsocketsFront
from iotpipe.observability import (
    ObservabilityServer,
    PortInUse,
    QueueDepthCollector,
    setup_logging,
)
from iotpipe.queue import AsyncQueue, PersistentQueue, QueueError
from iotpipe.security import check_security_settings
from iotpipe.settings import parse_settings
from iotpipe.tlsconfig import ReloadingTLS

__all__ = ["IngestServer", "IngestSettings", "main", "tune_interpreter"]

log = logging.getLogger("iotpipe.ingest")
PATH = "/v1/ingest"
# How often process 0 looks again for retired queues it could not open (still locked).
RETIRED_SCAN_SECONDS = 10.0


class IngestServer:
    """One ingest process: WebSocket server + queue + forwarder, on one event loop."""

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
        self.limits = FrameLimits(max_batch=settings.max_batch)
        self.draining = False
        self.buckets = DeviceBuckets(settings.rate_limit, settings.rate_burst)
        self.queue: PersistentQueue | None = None
        self.aqueue: AsyncQueue | None = None
        self.forwarder: Forwarder | None = None
        self.front: PicowsFront | None = None  # the picows core
        self.ws_front: WebsocketsFront | None = None  # the websockets core
        self.counters = IngestCounters()
        self._port = 0

    # -- readiness -------------------------------------------------------------------

    def ready(self) -> bool:
        fwd = self.forwarder
        listening = self.front is not None or self.ws_front is not None
        return (not self.draining and listening and fwd is not None
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

    def admit(self, target: str, authorization: str | None) -> Admitted | Refusal:
        """The handshake decision for both WebSocket cores (docs/protocols.md, 1.)."""
        url = urlsplit(target)
        if url.path != PATH:
            return Refusal(http.HTTPStatus.NOT_FOUND, f"no such path; use {PATH}\n", {})
        if self.draining:
            return Refusal(http.HTTPStatus.SERVICE_UNAVAILABLE, "draining\n", {})
        token_id: str | None = None
        if self.secret is None:
            device = parse_qs(url.query).get("device", [None])[0] or None
        else:
            try:
                token = bearer_token(authorization)
                identity = verify_identity(self.secret, token, DEVICE_AUDIENCE)
            except AuthError as exc:
                self.counters.auth_failures[exc.reason] += 1
                return Refusal(http.HTTPStatus.UNAUTHORIZED, f"{exc}\n", {
                    "WWW-Authenticate": f'Bearer error="invalid_token", '
                                        f'error_description="{exc.reason}"'})
            device, token_id = identity.subject, identity.token_id
        refusal = self.deny.refusal("device", device, token_id)
        if refusal is not None:
            self.counters.auth_failures["revoked"] += 1
            return Refusal(http.HTTPStatus.FORBIDDEN,
                           f"revoked: this {refusal} is on the deny list\n", {})
        return Admitted(device, token_id)

    # -- reloads (TLS certificate, deny list) ----------------------------------------

    def reload_deny_list(self) -> int:
        """Re-read the deny list; close open connections it now refuses (how many), each
        after the replies it is owed."""
        front = self._front()
        if self.deny_file is None or front is None:
            return 0
        closed = self.deny_file.revoke(
            "device", front.connections,
            lambda c: (getattr(c, "device_id", None), getattr(c, "token_id", None)),
            lambda c, reason: front.request_close(c, CLOSE_REVOKED, reason))
        self.deny = self.deny_file.current
        return closed

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.queue = PersistentQueue.open(self.queue_dir, capacity_bytes=s.queue_bytes,
                                          consumers=(CONSUMER,))
        self.node = queue_node_id(self.queue_dir, self.node)
        self.aqueue = AsyncQueue(self.queue)
        self.forwarder = Forwarder(
            self.queue, self.node, self.endpoints, batch_records=s.forward_batch,
            window=s.forward_window, ack_timeout=s.forward_ack_timeout,
            curve_keys=self.curve_keys,
        ).start(asyncio.get_running_loop())
        ssl_context = self.tls.context if self.tls is not None else None
        if ws_core(s) == "picows":
            self.front = PicowsFront(self, self.admit)
            self._port = await self.front.start(s.host, s.port, reuse_port=s.processes > 1,
                                                ssl_context=ssl_context)
        else:
            self.ws_front = WebsocketsFront(self)
            self._port = await self.ws_front.start(s.host, s.port, reuse_port=s.processes > 1,
                                                   ssl_context=ssl_context)

    def _front(self) -> PicowsFront | WebsocketsFront | None:
        return self.front if self.front is not None else self.ws_front

    @property
    def port(self) -> int:
        """The bound WebSocket port (known once started; kept after the listener closes)."""
        return self._port

    async def drain(self) -> bool:
        """Stop accepting, close devices at a bounded rate (each after the acks it is owed),
        wait for them and the appends in flight, empty the queue. True if empty."""
        s = self.settings
        deadline = time.monotonic() + s.drain_timeout
        self.draining = True
        front = self._front()
        assert front is not None and self.aqueue is not None
        front.stop_listening()
        closing = list(front.connections)
        log.info("draining", extra={"fields": {"connections": len(closing)}})
        interval = 1.0 / s.drain_close_rate
        # Half the drain time at most goes to spreading the closes; the rest at once.
        spread_until = time.monotonic() + s.drain_timeout / 2
        for conn in closing:
            front.request_close(conn, CLOSE_GOING_AWAY, "going away")  # type: ignore[arg-type]
            if time.monotonic() < spread_until:
                await asyncio.sleep(interval)
        await front.wait_closed(closing, deadline - time.monotonic())  # type: ignore[arg-type]
        await self.aqueue.wait_idle(deadline - time.monotonic())
        return await self._drain_queues(deadline)

    async def _drain_queues(self, deadline: float) -> bool:
        forwarder = self.forwarder
        assert forwarder is not None
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
        if self.ws_front is not None:
            await self.ws_front.aclose()
        if self.front is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.front.aclose(), 6)
        if self.forwarder is not None:
            await self.forwarder.aclose()
        if self.aqueue is not None:
            await self.aqueue.aclose()
        if self.queue is not None:
            self.queue.close()


async def run_process(settings: IngestSettings, index: int,
                      endpoints: Sequence[str] | None = None,
                      watched: EndpointsFile | None = None) -> int:
    """Run one ingest process until SIGTERM/SIGINT; returns the exit code."""
    server = IngestServer(settings, index, endpoints)
    # "retired": queues of processes this pod no longer runs, until drained and deleted
    # (so the depth covers everything on the pod's volume).
    REGISTRY.register(QueueDepthCollector("ingest", {
        "ingest": lambda: queue_depth(server.queue),
        "retired": lambda: retired_depth(list(server.retired.values()))}))
    REGISTRY.register(IngestCollector(
        server.counters, lambda: [server.forwarder.core] if server.forwarder else []))
    REGISTRY.register(RetiredCollector(lambda: list(server.retired.values()),
                                       lambda: server.retired_removed))
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
    reloads = asyncio.create_task(reload_security(
        server.tls, settings.tls_reload_seconds, server.reload_deny_list,
        settings.deny_list_reload_seconds))
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
        tune_interpreter(settings)
        # The kernel caps the backlog silently: say what the listener really got.
        backlog, somaxconn = listen_backlog(settings.listen_backlog)
        log.info("ingest listening", extra={"fields": {
            "node": server.node, "port": server.port, "metrics_port": obs.port,
            "listen_backlog": backlog, "somaxconn": somaxconn,
            "queue": str(server.queue_dir), "middle": server.endpoints,
            "retired_queues": sorted(server.retired)}})
        next_check = time.monotonic() + settings.endpoints_reload_seconds
        next_retired_scan = time.monotonic() + RETIRED_SCAN_SECONDS
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(),
                                       min(0.5, settings.endpoints_reload_seconds))
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
        reloads.cancel()
        await server.aclose()
        obs.stop()


def tune_interpreter(settings: IngestSettings) -> None:
    """Keep the interpreter from stalling the event loop; call once started.

    The objects made while starting (modules, settings, metrics) live as long as the
    process: frozen, the cyclic GC's full collections no longer walk them, each with the GIL
    held (docs/benchmarks.md). The switch interval bounds how long the event loop waits for
    the GIL while a helper thread (metrics, the forwarder's disk jobs) holds it.
    """
    sys.setswitchinterval(settings.gil_switch_interval)
    gc.collect()
    gc.freeze()


# Descriptors wanted: one per device connection, 100k per process and headroom.
NOFILE_WANTED = 1 << 20


def _raise_nofile() -> int:
    """RLIMIT_NOFILE up to ``NOFILE_WANTED``: the hard limit too where allowed (root,
    CAP_SYS_RESOURCE; never above fs.nr_open), else the soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (NOFILE_WANTED, hard):
        if soft >= limit:
            break
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: Sequence[str]) -> int:
    lifecycle.catch_early()  # a stop while the queue opens counts (see iotpipe.lifecycle)
    settings = parse_settings(IngestSettings, argv)
    setup_logging("ingest", settings.log_level)
    index = settings.process_index  # set by the parent through IOTPIPE_INGEST_PROCESS_INDEX
    if index >= 0 and settings.parent_pid:
        die_with_parent(settings.parent_pid)
    # websockets and picows log every connection open/close at INFO: far too much at C10K.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("picows").setLevel(logging.WARNING)
    try:
        endpoints, watched = settings.resolved_endpoints()
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
        return run_parent(settings, argv)
    _install_uvloop()
    _raise_nofile()
    return asyncio.run(run_process(settings, max(index, 0), endpoints, watched))
