"""``iotpipe middle``: the ZeroMQ I/O shell around the middle tier's sans-I/O cores.

One thread owns every socket (pyzmq sockets are not thread-safe) and runs this loop:

1. poll the fan-in ROUTER (5555) and the feed ROUTER (5557);
2. apply every waiting feed request (acks first, then credit);
3. drain the fan-in ROUTER without blocking, plan one group commit for all batches that
   arrived together and place their records in the log (``busy`` at once when the log is
   full: never a blocking wait, because the feed acks that free space are served by this
   same loop);
4. write the placed group (see below); once its fdatasync returned, answer ``ack`` for
   every batch whose records it made durable, then publish those records on the PUB socket
   (5556), sequenced by their log seq, so the sequence is gapless per middle and
   subscribers can see what they missed;
5. expire leases, send feed deliveries up to each consumer's credit (long poll: whatever
   was just made durable goes out at once), write the marks checkpoint when due, and move
   the queue's consumer cursors.

The group commit. Everything placed since the last write is written and synced as one
group. When the ROUTER had nothing more waiting, the loop writes it itself: nothing else to
do, and the acks leave the moment fdatasync returns (the lowest latency, while new batches
pile up in ZeroMQ's queues to form the next group). When more was waiting (the round
stopped at ``max_group_records``) or a full group is placed, the log writes in the
background, on a thread that never takes the GIL, while this loop acknowledges, publishes
and delivers the group before it and receives, plans and encodes the next one. Nothing is
acknowledged, published or delivered before its write's fdatasync returned, and the marks
that judge later batches as duplicates include the groups in flight, whose acks wait for
their write.

Durability of the dedup marks. The marks (which node seqs are stored) are rebuilt on open
from a checkpoint file plus the log records after the checkpoint's ``log_seq``. The
checkpoint is written atomically (tmp file, fsync, rename, directory fsync) every
``checkpoint_interval`` seconds and at shutdown, and the durable queue cursor of every group
is held at or below the checkpoint's ``log_seq``: a log record is never reclaimed before a
checkpoint covers its mark, so a crash cannot forget the mark of a reclaimed record. The
price is that after a crash up to ``checkpoint_interval`` seconds of records that storage
already acknowledged are delivered again (storage writes are idempotent). Marks are only
forgotten when the checkpoint file is lost or damaged (the tier then logs an error and
rebuilds from the retained log alone) or when a node has more than ``max_holes`` open gaps
(the oldest is closed). A node that then resends such an old, already acknowledged batch
gets it stored twice in the log, and storage drops the copy by ``(device_id, msg_id)``.

If a checkpoint cannot be written, the cursors simply stay where the last good one allows:
the log fills and ingest gets ``busy`` (backpressure), nothing is forgotten.

Feed consumers must send a request (a heartbeat restating their credit is enough) more
often than ``consumer_timeout``; a silent consumer is dropped and its deliveries go to the
others. A consumer seen from a new ZeroMQ peer (it reconnected or restarted) loses its
leases to redelivery at once.

A malformed frame on any socket is counted (``iotpipe_middle_malformed_frames_total``) and
logged at most once a second, never answered with data and never fatal.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import sys
import time
from collections import deque
from collections.abc import Sequence
from itertools import chain

import zmq
import zmq.backend
from prometheus_client import CollectorRegistry

from iotpipe import curve, lifecycle, wire
from iotpipe.middle import hot
from iotpipe.middle.core import (
    FeedCore,
    Intake,
    IntakePlan,
    RecentRecords,
    Reply,
    UnknownGroup,
    encode_checkpoint,
    group_messages,
    pub_sndhwm,
)
from iotpipe.middle.metrics import MiddleCollector
from iotpipe.middle.settings import MiddleSettings
from iotpipe.middle.store import (
    CHECKPOINT_FILE,
    QUEUE_DIR,
    read_checkpoint,
    rebuild_marks,
    write_checkpoint,
)
from iotpipe.observability import (
    ObservabilityServer,
    PortInUse,
    QueueDepthCollector,
    setup_logging,
)
from iotpipe.queue import PersistentQueue, QueueError, QueueFull
from iotpipe.settings import parse_settings

__all__ = ["MiddleServer", "MiddleSettings", "main"]

log = logging.getLogger("iotpipe.middle")

_SEND_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_SEND_NOBLOCK = int(zmq.NOBLOCK)
STATS_INTERVAL_S = 60.0


# -- the server --------------------------------------------------------------------------


class _RateLimitedWarning:
    """Log a recurring warning at most once per interval, with the count in between."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval = interval_s
        self._last = 0.0
        self._suppressed = 0

    def warn(self, msg: str, **fields: object) -> None:
        now = time.monotonic()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        log.warning(msg, extra={"fields": {**fields, "suppressed": self._suppressed}})
        self._last = now
        self._suppressed = 0


def _recv_multipart_nowait(sock: zmq.Socket[bytes]) -> list[bytes]:
    """recv_multipart(NOBLOCK) through the backend socket with int flags (raises Again).

    Each part is received as a Frame, whose ``more`` is read without a socket option call:
    asking the socket for RCVMORE converts the option to an enum on every call, which was
    a visible share of the loop's CPU time.
    """
    recv = zmq.backend.Socket.recv
    frame = recv(sock, _SEND_NOBLOCK, False)
    parts = [frame.bytes]
    while frame.more:
        frame = recv(sock, _SEND_NOBLOCK, False)
        parts.append(frame.bytes)
    return parts


def _endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class MiddleServer:
    """Owns the log, the cores and the sockets; ``run`` is the single-threaded loop."""

    def __init__(self, settings: MiddleSettings) -> None:
        if not settings.consumer_groups:
            raise ValueError("consumer_groups must name at least one group: without one the "
                             "log never frees space")
        self.settings = settings
        self.middle_id = settings.middle_id
        # Read before anything is opened: a bad keys directory is a clear startup error.
        self.curve_keys = (curve.load_keys(settings.curve_keys_dir, "middle")
                           if settings.curve_keys_dir else None)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = settings.data_dir / CHECKPOINT_FILE
        self.queue = PersistentQueue.open(
            settings.data_dir / QUEUE_DIR,
            capacity_bytes=settings.log_bytes,
            segment_bytes=min(settings.segment_bytes, settings.log_bytes),
            persist=settings.persist,
            consumers=settings.consumer_groups,
        )
        for stale in set(self.queue.consumers) - set(settings.consumer_groups):
            # The setting is the source of truth: a group dropped from it must not hold
            # the log's space forever.
            log.warning("consumer group no longer configured: forgetting its cursor",
                        extra={"fields": {"group": stale, "acked": self.queue.acked(stale)}})
            self.queue.unregister_consumer(stale)
        self.tail = self.queue.next_seq - 1
        self.ckpt_log_seq, marks = read_checkpoint(self.checkpoint_path, settings.max_holes)
        if self.ckpt_log_seq > self.tail:
            log.warning("marks checkpoint is ahead of the log (was the log reset?); "
                        "keeping its marks", extra={"fields": {
                            "checkpoint_log_seq": self.ckpt_log_seq, "log_tail": self.tail}})
        scanned = rebuild_marks(self.queue, self.ckpt_log_seq, marks)
        self.intake = Intake(marks)
        self.durable_cursor = {g: self.queue.acked(g) for g in settings.consumer_groups}
        self.feed = FeedCore(
            self.durable_cursor,
            lease_timeout=settings.lease_timeout,
            consumer_timeout=settings.consumer_timeout,
            max_records=settings.max_delivery_records,
        )
        self._live_meta_prefix = wire.live_meta_prefix(self.middle_id)
        self.recent = RecentRecords(settings.recent_bytes)
        self.feed_snapshot = {g: (self.feed.lag(g, self.tail), 0) for g in self.feed.groups}
        self.group_commits = 0
        # Placed in the log, not yet durable: (first seq, log records) per plan.
        self._placed: deque[tuple[int, Sequence[bytes]]] = deque()
        self._placed_records = 0
        self._receiving = True  # the ROUTER is polled (not while too much awaits the disk)
        self._placed_limit = 2 * settings.max_group_records
        self._more_waiting = False  # the last round left batches in the ROUTER
        self.published = 0
        self.unpublishable = 0
        self.malformed = {"router": 0, "feed": 0}
        self.ready = False
        self._stopping = False
        self._last_checkpoint = time.monotonic()
        self._last_cursor_sync = 0.0
        self._last_stats = time.monotonic()
        self._warn_router = _RateLimitedWarning()
        self._warn_feed = _RateLimitedWarning()
        self._warn_checkpoint = _RateLimitedWarning(10.0)
        self.checkpoint_failures = 0
        log.info("log open", extra={"fields": {
            "path": str(settings.data_dir / QUEUE_DIR), "first_seq": self.queue.first_seq,
            "next_seq": self.queue.next_seq, "persist": self.queue.persist_mode,
            "checkpoint_log_seq": self.ckpt_log_seq, "rebuilt_from_records": scanned,
            "nodes": len(marks.nodes()), "cursors": self.durable_cursor}})

        self.ctx = zmq.Context()
        self.gatekeeper: curve.Gatekeeper | None = None
        self.handshakes: curve.HandshakeWatch | None = None
        self._last_key_check = time.monotonic()
        if self.curve_keys is not None:
            # The ZAP handler must run before the CURVE sockets bind.
            self.gatekeeper = curve.Gatekeeper(self.ctx, settings.curve_keys_dir,
                                               self.curve_keys).start()
        ipv6 = ":" in settings.host
        self.router = self._socket(zmq.ROUTER, ipv6)
        self.router.setsockopt(zmq.RCVHWM, 100_000)
        self.pub = self._socket(zmq.PUB, ipv6)
        self.pub.setsockopt(zmq.SNDHWM, pub_sndhwm(settings.pub_hwm, settings.live_format,
                                                   settings.live_group_records))
        self.feed_sock = self._socket(zmq.ROUTER, ipv6)
        # Sending to a vanished consumer raises instead of dropping silently, so its
        # lease goes back to the pool at once.
        self.feed_sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.feed_sock.setsockopt(zmq.SNDHWM, 10_000)
        if self.curve_keys is not None:
            servers = {"router": self.router, "pub": self.pub, "feed": self.feed_sock}
            for domain, sock in servers.items():
                curve.secure_server(sock, self.curve_keys, domain)
            self.handshakes = curve.HandshakeWatch(servers)
        self.router.bind(_endpoint(settings.host, settings.router_port))
        self.pub.bind(_endpoint(settings.host, settings.pub_port))
        self.feed_sock.bind(_endpoint(settings.host, settings.feed_port))
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.feed_sock, zmq.POLLIN)
        self.poller.register(self.queue.durable_fileno(), zmq.POLLIN)
        for monitor in self.handshakes.sockets() if self.handshakes else ():
            self.poller.register(monitor, zmq.POLLIN)
        self.ready = True

    def _socket(self, kind: int, ipv6: bool) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 1000)  # let final replies go out at shutdown
        if ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        return sock

    def depth(self) -> tuple[int, int, int]:
        depth = self.queue.depth()
        return depth.records, depth.bytes, self.queue.capacity_bytes

    def stop(self) -> None:
        self._stopping = True

    # -- the loop

    def run(self) -> None:
        while not self._stopping:
            events = dict(self.poller.poll(100))
            now = time.monotonic()
            if self.feed_sock in events:
                self._receive_feed(now)
            self._more_waiting = False
            if self.router in events:
                self._receive_batches()
            if self._placed or self.intake.held:
                self._write()
            if self.handshakes is not None:
                self._security(events, now)
            self.feed.expire(now)
            self._deliver(now)
            self._maybe_checkpoint(now)
            self._sync_cursors(now)
            if now - self._last_stats >= STATS_INTERVAL_S:
                self._log_stats(now)

    def _security(self, events: dict[zmq.Socket[bytes], int], now: float) -> None:
        assert self.handshakes is not None and self.gatekeeper is not None
        for monitor in self.handshakes.sockets():
            if monitor in events:
                self.handshakes.drain(monitor)
        if now - self._last_key_check >= self.settings.curve_reload_seconds:
            self._last_key_check = now
            self.gatekeeper.reload()

    def _log_stats(self, now: float) -> None:
        """One summary line a minute (never a line per message)."""
        self._last_stats = now
        intake, feed = self.intake.counters, self.feed.counters
        log.info("stats", extra={"fields": {
            "log_tail": self.tail, "batches": intake.batches, "records": intake.records,
            "duplicates": intake.duplicates, "busy": intake.busy,
            "group_commits": self.group_commits, "published": self.published,
            "delivered": feed.delivered_records, "redelivered": feed.redelivered_records,
            "malformed": dict(self.malformed),
            "lag": {g: lag for g, (lag, _) in self.feed_snapshot.items()}}})

    def _receive_batches(self) -> None:
        arrivals: list[tuple[bytes, wire.Batch]] = []
        readings = 0
        self._more_waiting = True  # unless the ROUTER runs dry first
        while readings < self.settings.max_group_records:
            try:
                msg = _recv_multipart_nowait(self.router)
            except zmq.Again:
                self._more_waiting = False
                break
            peer, frames = msg[0], msg[1:]
            try:
                batch = hot.decode_batch(frames)
            except wire.WireError as exc:
                self.malformed["router"] += 1
                self._warn_router.warn("malformed batch ignored", error=str(exc))
                continue
            arrivals.append((peer, batch))
            readings += len(batch.readings)
        if arrivals:
            self._send_replies(self.intake.take(arrivals, self._place,
                                                self.settings.busy_retry_ms))
        # While one full group is being written the next may be received and placed; past
        # that, leave the rest in ZeroMQ's queues (and ingest's windows) until the write
        # ends, so memory stays bounded by about three groups.
        receiving = self._placed_records < self._placed_limit
        if receiving != self._receiving:
            self._receiving = receiving
            self.poller.modify(self.router, zmq.POLLIN if receiving else 0)

    def _place(self, plan: IntakePlan) -> int | str:
        """Place the plan's records in the log: the seq that must be durable before its
        batches are acknowledged, or why they cannot be stored."""
        if not plan.records:  # all duplicates: acknowledged once what precedes is durable
            return self.queue.next_seq - 1
        try:
            seqs = self.queue.append_nowait(plan.records)
        except QueueFull:
            return "log full"
        except ValueError as exc:  # a record larger than a log segment can never fit
            log.error("reading too large for the log", extra={"fields": {"error": str(exc)}})
            return "reading too large for the log"
        self._placed.append((seqs.start, plan.records))
        self._placed_records += len(plan.records)
        return seqs[-1]

    def _write(self) -> None:
        """Settle a background write that ended; start the next group's (see the module doc
        for where it runs)."""
        durable = self.queue.poll_durable()
        # In the background when more is waiting or a full group is placed (its sync is
        # long enough, and the work on the next group plentiful enough, to be worth the
        # hand-off); smaller groups are written here: their hand-off's wake-ups only added
        # latency and CPU (docs/benchmarks.md).
        background = (self._more_waiting
                      or self._placed_records >= self.settings.max_group_records)
        if not self.queue.writing and self.queue.start_write(background=background):
            durable = self.queue.poll_durable()
        self._settle(durable)

    def _settle(self, durable: int) -> None:
        """The log is durable up to ``durable``: answer, then serve, what that covers."""
        if durable > self.tail:
            self.group_commits += 1
            self.tail = durable
        self._send_replies(self.intake.durable(durable))
        # Acks first: live events are best effort, and publishing a large group costs
        # about a microsecond per record that ingest's window would otherwise wait on.
        placed = self._placed
        while placed and placed[0][0] + len(placed[0][1]) - 1 <= durable:  # its last seq
            first_seq, records = placed.popleft()
            self._placed_records -= len(records)
            self.recent.extend(first_seq, records)
            self._publish(first_seq, hot.record_readings(records))
        if not self._receiving and self._placed_records < self._placed_limit:
            self._receiving = True
            self.poller.modify(self.router, zmq.POLLIN)

    def _publish(self, first_seq: int, readings: Sequence[bytes]) -> None:
        # Frames are sent one by one through the backend socket with precomputed int
        # flags: send_multipart's per-frame enum arithmetic costs more than the send.
        send = zmq.backend.Socket.send
        pub = self.pub
        more, last = _SEND_MORE_NOBLOCK, _SEND_NOBLOCK
        if self.settings.live_format == "v2":
            for frames in group_messages(self.middle_id, first_seq, readings,
                                         self.settings.live_group_records):
                for frame in frames[:-1]:
                    send(pub, frame, more)
                send(pub, frames[-1], last)
            self.published += len(readings)
            return
        # v1: the frames of wire.encode_live, one message per record
        events = hot.live_frames(self._live_meta_prefix, first_seq, readings)
        for topic, meta, reading in events:
            send(pub, topic, more)
            send(pub, meta, more)
            send(pub, reading, last)
        self.published += len(events)
        self.unpublishable += len(readings) - len(events)

    def _send_replies(self, replies: Sequence[Reply]) -> None:
        send = zmq.backend.Socket.send
        router = self.router
        for reply in replies:
            # A ROUTER drops (never blocks) on a full or unknown peer; that peer resends.
            try:
                send(router, reply.peer, _SEND_MORE_NOBLOCK)
                frames = reply.frames
                for frame in frames[:-1]:
                    send(router, frame, _SEND_MORE_NOBLOCK)
                send(router, frames[-1], _SEND_NOBLOCK)
            except zmq.Again:
                pass

    def _receive_feed(self, now: float) -> None:
        while True:
            try:
                msg = _recv_multipart_nowait(self.feed_sock)
            except zmq.Again:
                return
            peer, frames = msg[0], msg[1:]
            try:
                request = wire.decode_feed_request(frames)
                self.feed.on_request(peer, request, now, self.tail)
            except wire.WireError as exc:
                self.malformed["feed"] += 1
                self._warn_feed.warn("malformed feed request ignored", error=str(exc))
            except UnknownGroup as exc:
                self.malformed["feed"] += 1
                self._warn_feed.warn("feed request for a group this middle does not serve "
                                     "ignored", group=str(exc.args[0]),
                                     served=self.feed.groups)

    def _deliver(self, now: float) -> None:
        send = zmq.backend.Socket.send
        sock = self.feed_sock
        max_bytes = self.settings.max_delivery_bytes
        while (lease := self.feed.next_delivery(now, self.tail)) is not None:
            # The records in parts (runs of the recent groups, or one list read from the
            # log), packed straight from them.
            parts = self.recent.get(lease.first, lease.count, max_bytes)
            first_read: int | None = lease.first
            if parts is None:
                records = self.queue.read(lease.first, max_records=lease.count,
                                          max_bytes=max_bytes)
                first_read = records[0].seq if records else None
                parts = [[r.payload for r in records]]
            count = sum(map(len, parts))
            gone = self.feed.fit_read(lease, first_read, count, self.tail)
            if gone is not None:
                log.error("log no longer holds records a group has not acknowledged",
                          extra={"fields": {"group": lease.group, "first": gone[0],
                                            "last": gone[1],
                                            "log_first_seq": self.queue.first_seq}})
                continue
            if count > lease.count:  # both reads are bounded by it: never in practice
                parts = [list(chain.from_iterable(parts))[:lease.count]]
                count = lease.count
            if self.feed.records_version(lease) >= 2:
                frames = wire.encode_records_packed(lease.group, self.middle_id, lease.first,
                                                    count, hot.pack_runs(parts))
            else:
                frames = wire.encode_records(lease.group, self.middle_id, lease.first,
                                             list(chain.from_iterable(parts)), 1)
            try:
                # The peer frame fails fast (unknown peer, full queue); once it is accepted
                # the rest of the multipart message is too.
                send(sock, lease.peer, _SEND_MORE_NOBLOCK)
            except zmq.ZMQError as exc:
                self.feed.shrink(lease, 0)
                if exc.errno == zmq.EHOSTUNREACH:
                    self.feed.peer_gone(lease.peer)
                    continue
                return  # send queue full: try again next round
            for frame in frames[:-1]:
                send(sock, frame, _SEND_MORE_NOBLOCK)
            send(sock, frames[-1], _SEND_NOBLOCK)

    def _maybe_checkpoint(self, now: float, force: bool = False) -> None:
        if self.tail <= self.ckpt_log_seq and not force:
            return
        if not force and now - self._last_checkpoint < self.settings.checkpoint_interval:
            return
        self._last_checkpoint = now
        try:
            write_checkpoint(self.checkpoint_path,
                             encode_checkpoint(self.tail, self.intake.marks))
        except OSError as exc:
            # Not fatal: the queue cursors stay at the last good checkpoint, so the log
            # fills and ingest gets busy replies (backpressure) until writes work again.
            self.checkpoint_failures += 1
            self._warn_checkpoint.warn("marks checkpoint write failed", error=str(exc))
            return
        self.ckpt_log_seq = self.tail

    def _sync_cursors(self, now: float, final: bool = False) -> None:
        # Each ack is a durable write; a few per second are plenty to free space.
        if not final and now - self._last_cursor_sync < 0.2:
            return
        self._last_cursor_sync = now
        # Per-group figures for the metrics thread, computed here on the loop thread that
        # owns the feed state (never read half-updated from another thread).
        self.feed_snapshot = {g: (self.feed.lag(g, self.tail), self.feed.consumer_count(g))
                              for g in self.feed.groups}
        for group in self.feed.groups:
            # Never past the checkpoint: a reclaimed record's mark must be in a checkpoint.
            target = min(self.feed.cursor(group), self.ckpt_log_seq)
            if target > self.durable_cursor[group]:
                self.queue.ack(group, target)
                self.durable_cursor[group] = target

    def close(self) -> None:
        """Flush the checkpoint and cursors, close sockets and the log."""
        self.ready = False
        try:
            with contextlib.suppress(QueueError):  # a failed write: its batches stay unacked
                self._settle(self.queue.poll_durable(wait=True))  # the background write
                self.queue.start_write(background=False)  # and what was placed after it
                self._settle(self.queue.poll_durable())
            self._maybe_checkpoint(time.monotonic(), force=True)
            self._sync_cursors(time.monotonic(), final=True)
        finally:
            if self.handshakes is not None:
                self.handshakes.close()
            for sock in (self.router, self.pub, self.feed_sock):
                sock.close()
            if self.gatekeeper is not None:
                self.gatekeeper.stop()
            self.ctx.term()
            self.queue.close()


def main(argv: Sequence[str]) -> int:
    """``iotpipe middle``: run until SIGTERM/SIGINT, then flush and exit 0."""
    lifecycle.catch_early()  # a stop during the (up to seconds long) log recovery counts
    settings = parse_settings(MiddleSettings, argv)
    setup_logging("middle", settings.log_level)
    registry = CollectorRegistry()
    holder: dict[str, MiddleServer] = {}
    try:
        observability = ObservabilityServer(
            settings.host, settings.metrics_port,
            ready=lambda: "server" in holder and holder["server"].ready, registry=registry,
        ).start()
    except PortInUse as exc:
        print(f"iotpipe middle: error: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            server = MiddleServer(settings)
        except (ValueError, zmq.ZMQError, OSError) as exc:
            log.error("middle failed to start", extra={"fields": {"error": str(exc)}})
            detail = str(exc)
            if getattr(exc, "errno", None) == errno.EADDRINUSE:
                detail = (f"one of the ports {settings.router_port}, {settings.pub_port}, "
                          f"{settings.feed_port} on {settings.host} is in use ({exc})")
            print(f"iotpipe middle: error: {detail}", file=sys.stderr)
            return 1
        holder["server"] = server
        registry.register(MiddleCollector(server))
        registry.register(QueueDepthCollector("middle", {"log": server.depth}))

        lifecycle.on_stop(lambda _signum: server.stop())  # early: run() returns at once
        log.info("middle ready", extra={"fields": {
            "middle_id": server.middle_id, "router_port": settings.router_port,
            "pub_port": settings.pub_port, "feed_port": settings.feed_port,
            "groups": settings.consumer_groups}})
        try:
            server.run()
        except Exception:  # e.g. an I/O error on the log: exit non-zero, restart clean
            log.exception("middle failed")
            with contextlib.suppress(Exception):
                server.close()
            return 1
        server.close()
        log.info("middle stopped", extra={"fields": {"log_tail": server.tail}})
        return 0
    finally:
        observability.stop()
