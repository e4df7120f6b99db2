"""``iotpipe middle``: the ZeroMQ I/O shell around the middle tier's sans-I/O cores.

One thread owns every socket (pyzmq sockets are not thread-safe) and runs this loop:

1. poll the fan-in ROUTER (5555) and the feed ROUTER (5557);
2. apply every waiting feed request (acks first, then credit);
3. drain the fan-in ROUTER without blocking, plan one group commit for all batches that
   arrived together, append them with ONE durable ``append`` (one fdatasync), and only then
   answer ``ack`` (or ``busy`` when the log is full: never a blocking wait, because the feed
   acks that free space are served by this same loop);
4. publish every appended record on the PUB socket (5556), sequenced by its log seq, so the
   sequence is gapless per middle and subscribers can see what they missed;
5. expire leases, send feed deliveries up to each consumer's credit (long poll: whatever
   was just appended goes out at once), write the marks checkpoint when due, and move the
   queue's consumer cursors.

While the append's fdatasync runs, new batches pile up in ZeroMQ's queues and form the next
group: that is the group commit.

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
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Literal

import msgpack
import zmq
import zmq.backend
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import Field

from iotpipe import curve, lifecycle, wire
from iotpipe.durable import write_atomic
from iotpipe.middle.core import (
    CheckpointError,
    FeedCore,
    Intake,
    IntakePlan,
    NodeMarks,
    RecentRecords,
    Reply,
    UnknownGroup,
    decode_checkpoint,
    encode_checkpoint,
    reading_topic,
)
from iotpipe.observability import (
    ObservabilityServer,
    PortInUse,
    QueueDepthCollector,
    setup_logging,
)
from iotpipe.queue import PersistentQueue, QueueFull
from iotpipe.settings import CommaList, ServerSettings, parse_settings, tier_config

__all__ = ["MiddleServer", "MiddleSettings", "main", "read_checkpoint", "write_checkpoint"]

log = logging.getLogger("iotpipe.middle")

CHECKPOINT_FILE = "marks.ckpt"
_SEND_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_SEND_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_packb = msgpack.Packer(use_bin_type=True).pack
QUEUE_DIR = "queue"
STATS_INTERVAL_S = 60.0


class MiddleSettings(ServerSettings):
    """Fan-in log (ROUTER), live fan-out (PUB) and the durable storage feed (ROUTER)."""

    model_config = tier_config("iotpipe middle", "IOTPIPE_MIDDLE_")

    host: str = Field("0.0.0.0", description="bind address of every socket and the metrics port")
    metrics_port: int = Field(9101, ge=0, le=65535,
                              description="port of /metrics, /healthz and /readyz")
    router_port: int = Field(5555, ge=1, le=65535,
                             description="ROUTER port receiving batches from ingest nodes")
    pub_port: int = Field(5556, ge=1, le=65535, description="PUB port of live events (relay)")
    feed_port: int = Field(5557, ge=1, le=65535,
                           description="ROUTER port of the durable feed (storage consumers)")
    data_dir: Path = Field(Path("/var/lib/iotpipe/log"),
                           description="directory of the log (queue/) and the marks checkpoint")
    log_bytes: int = Field(4 << 30, ge=1 << 16, description="log capacity in bytes")
    segment_bytes: int = Field(64 << 20, ge=1 << 12,
                               description="log segment file size (capped to log_bytes)")
    persist: Literal["auto", "fdatasync", "pmem"] = Field(
        "auto", description="log persist backend: auto (pmem only on real pmem), fdatasync, pmem")
    middle_id: str = Field(default_factory=socket.gethostname,
                           description="this middle's name in live events and deliveries")
    consumer_groups: CommaList = Field(
        ["storage"],
        description="durable feed consumer groups, comma separated; the log keeps every "
                    "record until each of them acknowledged it")
    lease_timeout: float = Field(30.0, gt=0,
                                 description="seconds before an unacknowledged delivery is "
                                             "redelivered")
    consumer_timeout: float = Field(30.0, gt=0,
                                    description="seconds without a feed request after which a "
                                                "consumer is dropped and its deliveries "
                                                "redelivered")
    checkpoint_interval: float = Field(1.0, gt=0,
                                       description="seconds between dedup-marks checkpoints")
    max_holes: int = Field(256, ge=1,
                           description="open gaps remembered per ingest node (oldest closed)")
    max_delivery_records: int = Field(512, ge=1, description="records per feed delivery")
    max_delivery_bytes: int = Field(4 << 20, ge=1024, description="bytes per feed delivery")
    recent_bytes: int = Field(64 << 20, ge=0,
                              description="recently appended records kept in memory to serve "
                                          "feed deliveries without reading the log")
    max_group_records: int = Field(16384, ge=1,
                                   description="readings gathered into one group commit")
    busy_retry_ms: int = Field(200, ge=1, description="retry hint sent with busy replies")
    pub_hwm: int = Field(100_000, ge=1,
                         description="PUB send high-water mark per subscriber (messages); "
                                     "a subscriber further behind misses events")
    curve_keys_dir: str = Field(
        "", description="CurveZMQ keys directory (docs/security.md): every socket then admits "
                        "only the pipeline's own tiers; empty = no CURVE (plain ZeroMQ)")
    curve_reload_seconds: float = Field(
        5.0, gt=0, description="seconds between checks of the keys directory for changed "
                               "admitted client keys (rotation)")


# -- checkpoint file ---------------------------------------------------------------------


def write_checkpoint(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    write_atomic(path, data)


def read_checkpoint(path: Path, max_holes: int) -> tuple[int, NodeMarks]:
    """(log_seq, marks) from the checkpoint file; (0, empty) when there is none or it is bad."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0, NodeMarks(max_holes)
    try:
        ckpt = decode_checkpoint(data, max_holes)
    except CheckpointError as exc:
        log.error("marks checkpoint unusable, rebuilding dedup marks from the retained log "
                  "only", extra={"fields": {"path": str(path), "error": str(exc)}})
        return 0, NodeMarks(max_holes)
    return ckpt.log_seq, ckpt.marks


def rebuild_marks(queue: PersistentQueue, log_seq: int, marks: NodeMarks) -> int:
    """Add the marks of every retained record after ``log_seq``; the number of records read."""
    seq = max(log_seq + 1, queue.first_seq)
    scanned = 0
    run_node, run_first, run_last = "", 0, -1
    while seq < queue.next_seq:
        records = queue.read(seq, max_records=8192, max_bytes=64 << 20)
        if not records:
            break
        for record in records:
            try:
                node, node_seq, _ = wire.decode_log_record(record.payload)
            except wire.WireError as exc:
                log.error("undecodable log record skipped while rebuilding marks",
                          extra={"fields": {"seq": record.seq, "error": str(exc)}})
                continue
            if node == run_node and node_seq == run_last + 1:
                run_last = node_seq
                continue
            if run_last >= run_first and run_node:
                marks.add(run_node, run_first, run_last)
            run_node, run_first, run_last = node, node_seq, node_seq
        scanned += len(records)
        seq = records[-1].seq + 1
    if run_node and run_last >= run_first:
        marks.add(run_node, run_first, run_last)
    return scanned


# -- metrics -----------------------------------------------------------------------------


class _MiddleCollector:
    """Counters read from the cores at scrape time: no metric call per message."""

    def __init__(self, server: MiddleServer) -> None:
        self._server = server

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self._server
        intake, feed = s.intake.counters, s.feed.counters

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"iotpipe_middle_{name}", text, value=value)

        yield counter("batches", "Batches acknowledged to ingest nodes", intake.batches)
        yield counter("records", "Records appended to the log", intake.records)
        yield counter("duplicate_records", "Readings dropped as already stored",
                      intake.duplicates)
        yield counter("busy_replies", "Batches answered busy (log full)", intake.busy)
        yield counter("skipped_ahead_batches",
                      "Batches that started above the node's high-water mark + 1",
                      intake.skipped_ahead)
        yield counter("group_commits", "Durable appends (each shares one fdatasync)",
                      s.group_commits)
        malformed = CounterMetricFamily("iotpipe_middle_malformed_frames",
                                        "Frames that did not follow the wire format",
                                        labels=["socket"])
        for sock_name, value in s.malformed.items():
            malformed.add_metric([sock_name], value)
        yield malformed
        yield counter("checkpoint_failures", "Marks checkpoint writes that failed",
                      s.checkpoint_failures)
        yield counter("pub_messages", "Live events published", s.published)
        yield counter("unpublishable_records", "Records whose reading had no device id",
                      s.unpublishable)
        yield counter("feed_requests", "Feed requests received", feed.requests)
        yield counter("feed_deliveries", "Feed deliveries sent", feed.deliveries)
        yield counter("feed_delivered_records", "Records sent in feed deliveries",
                      feed.delivered_records)
        yield counter("feed_redelivered_records",
                      "Records returned for redelivery (lease expired, consumer gone)",
                      feed.redelivered_records)
        yield counter("feed_acked_records", "Records acknowledged by feed consumers",
                      feed.acked_records)
        lag = GaugeMetricFamily("iotpipe_middle_feed_lag_records",
                                "Records appended but not yet acknowledged, per group",
                                labels=["group"])
        consumers = GaugeMetricFamily("iotpipe_middle_feed_consumers",
                                      "Feed consumers currently known, per group",
                                      labels=["group"])
        tail = s.tail
        for group, (group_lag, group_consumers) in s.feed_snapshot.items():
            lag.add_metric([group], group_lag)
            consumers.add_metric([group], group_consumers)
        yield lag
        yield consumers
        yield GaugeMetricFamily("iotpipe_middle_log_tail_seq", "Highest log seq appended",
                                value=tail)
        if s.gatekeeper is not None and s.handshakes is not None:
            refused = CounterMetricFamily(
                "iotpipe_middle_refused_handshakes",
                "ZeroMQ connections refused: reason=key (ZAP: not a key of this pipeline), "
                "no_curve, wrong_server_key, protocol", labels=["socket", "reason"])
            for domain, value in s.gatekeeper.refused.items():
                refused.add_metric([domain, "key"], value)
            for (domain, reason), value in list(s.handshakes.failed.items()):
                refused.add_metric([domain, reason], value)
            yield refused
            # Which keys this process runs with and admits right now: the operator's key
            # rotation waits on these before it promotes and before it retires.
            admitted = GaugeMetricFamily(
                "iotpipe_middle_curve_admitted_key",
                "1 per client public key (fingerprint: sha256 hex prefix) each socket admits",
                labels=["socket", "fingerprint"])
            for domain in curve.ADMITTED:
                for key in sorted(s.gatekeeper.admitted(domain)):
                    admitted.add_metric([domain, curve.fingerprint(key)], 1)
            yield admitted
            own = GaugeMetricFamily("iotpipe_middle_curve_own_key",
                                    "1 for this middle's own public key (fingerprint), read "
                                    "at start", labels=["fingerprint"])
            own.add_metric([curve.fingerprint(s.gatekeeper.keys.own.public)], 1)
            yield own
            disk = GaugeMetricFamily("iotpipe_middle_curve_disk_key",
                                     "1 for the middle's own public key (fingerprint) in the "
                                     "keys directory now (used after a restart)",
                                     labels=["fingerprint"])
            disk.add_metric([curve.fingerprint(s.gatekeeper.disk_public)], 1)
            yield disk


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

    A batch has one frame per reading; the sugar layer's per-frame enum conversions were
    a visible share of the loop's CPU time.
    """
    recv, get = zmq.backend.Socket.recv, zmq.backend.Socket.get
    parts = [recv(sock, _SEND_NOBLOCK)]
    while get(sock, _RCVMORE):
        parts.append(recv(sock, _SEND_NOBLOCK))
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
        # wire.encode_live's meta map {"m": middle_id, "s": seq} up to the seq value
        self._live_meta_prefix = b"\x82\xa1m" + _packb(self.middle_id) + b"\xa1s"
        self.recent = RecentRecords(settings.recent_bytes)
        self.feed_snapshot = {g: (self.feed.lag(g, self.tail), 0) for g in self.feed.groups}
        self.group_commits = 0
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
        self.pub.setsockopt(zmq.SNDHWM, settings.pub_hwm)
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
            if self.router in events:
                self._receive_batches()
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
        while readings < self.settings.max_group_records:
            try:
                msg = _recv_multipart_nowait(self.router)
            except zmq.Again:
                break
            peer, frames = msg[0], msg[1:]
            try:
                batch = wire.decode_batch(frames)
            except wire.WireError as exc:
                self.malformed["router"] += 1
                self._warn_router.warn("malformed batch ignored", error=str(exc))
                continue
            arrivals.append((peer, batch))
            readings += len(batch.readings)
        if arrivals:
            self._send_replies(self._commit(arrivals))

    def _commit(self, arrivals: Sequence[tuple[bytes, wire.Batch]]) -> list[Reply]:
        plan = self.intake.plan(arrivals)
        refusal = self._append(plan)
        if refusal is None:
            return self.intake.committed(plan)
        if len(arrivals) == 1:
            return self.intake.refused(plan, self.settings.busy_retry_ms, refusal)
        # The group did not fit: store batches one at a time, in arrival order, and refuse
        # everything from the first that does not fit, so batches keep their order.
        replies: list[Reply] = []
        for i, arrival in enumerate(arrivals):
            single = self.intake.plan([arrival])
            refusal = self._append(single)
            if refusal is not None:
                rest = self.intake.plan(arrivals[i:])
                return replies + self.intake.refused(rest, self.settings.busy_retry_ms,
                                                     refusal)
            replies += self.intake.committed(single)
        return replies

    def _append(self, plan: IntakePlan) -> str | None:
        """Append the plan's records durably and publish them; the refusal reason if not."""
        if not plan.records:
            return None
        try:
            seqs = self.queue.append(plan.records, timeout=0.0)
        except QueueFull:
            return "log full"
        except ValueError as exc:  # a record larger than a log segment can never fit
            log.error("reading too large for the log", extra={"fields": {"error": str(exc)}})
            return "reading too large for the log"
        self.group_commits += 1
        self.tail = seqs[-1]
        self.recent.extend(seqs.start, plan.records)
        self._publish(seqs.start, plan.readings)
        return None

    def _publish(self, first_seq: int, readings: Sequence[bytes]) -> None:
        # The frames of wire.encode_live, sent frame by frame through the backend socket
        # with precomputed int flags: send_multipart's per-frame enum arithmetic cost more
        # than everything else per record (measured: ~140k vs ~580k events/s).
        send = zmq.backend.Socket.send
        pub = self.pub
        more, last = _SEND_MORE_NOBLOCK, _SEND_NOBLOCK
        meta_prefix = self._live_meta_prefix
        pack = _packb
        published = 0
        for seq, reading in enumerate(readings, first_seq):
            topic = reading_topic(reading)
            if topic is None:
                self.unpublishable += 1
                continue
            send(pub, topic, more)
            send(pub, meta_prefix + pack(seq), more)
            send(pub, reading, last)
            published += 1
        self.published += published

    def _send_replies(self, replies: Sequence[Reply]) -> None:
        send = zmq.backend.Socket.send
        router = self.router
        for reply in replies:
            # A ROUTER drops (never blocks) on a full or unknown peer; that peer resends.
            with contextlib.suppress(zmq.Again):
                send(router, reply.peer, _SEND_MORE_NOBLOCK)
                frames = reply.frames
                for frame in frames[:-1]:
                    send(router, frame, _SEND_MORE_NOBLOCK)
                send(router, frames[-1], _SEND_NOBLOCK)

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
            payloads = self.recent.get(lease.first, lease.count, max_bytes)
            if payloads is None:
                records = self.queue.read(lease.first, max_records=lease.count,
                                          max_bytes=max_bytes)
                if not records or records[0].seq != lease.first:
                    # Only possible if the log dropped records a group had not acked (a
                    # bug or a damaged ledger): say so loudly and move on, never spin.
                    gone_last = records[0].seq - 1 if records else lease.last
                    log.error("log no longer holds records a group has not acknowledged",
                              extra={"fields": {"group": lease.group, "first": lease.first,
                                                "last": gone_last,
                                                "log_first_seq": self.queue.first_seq}})
                    self.feed.shrink(lease, 0)
                    self.feed.skip(lease.group, lease.first, gone_last, self.tail)
                    continue
                payloads = [r.payload for r in records]
            if len(payloads) < lease.count:
                self.feed.shrink(lease, len(payloads))
            frames = wire.encode_records(lease.group, self.middle_id, lease.first, payloads)
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
        registry.register(_MiddleCollector(server))
        registry.register(QueueDepthCollector("middle", {"log": server.depth}))

        def _on_signal(signum: int, frame: FrameType | None) -> None:
            server.stop()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        if lifecycle.requested():
            server.stop()  # stopped while starting: run() returns at once
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
