"""``iotpipe storage``: the I/O shell around the feed consumer, enrichment and sinks.

One thread owns everything: a DEALER socket per middle feed endpoint, the registry watcher
and the sinks. The loop restates credit (heartbeat), polls every socket, drains what has
arrived (up to ``max_batch_records``), enriches it, writes it to every sink (one write per
sink for all deliveries that arrived together: group commit) and only then acknowledges
each delivery to the middle it came from. So an acknowledged record is durable in every
sink, and a record that was written but not acknowledged (SIGKILL between the two) is
redelivered and ignored as a duplicate.

A sink write that fails is retried with backoff (the other sinks are not rewritten); the
tier is not ready meanwhile. SIGTERM or SIGINT lets the batch in hand finish and be
acknowledged, sends the last acks with credit 0, and exits 0. If the sinks are failing at
that moment, the unacknowledged batch is given up (the middle redelivers it) and the exit
status is 1.

``--feed-endpoints-file`` (key ``feed`` of the operator's endpoints ConfigMap) is re-read
every ``--endpoints-reload-seconds`` between batches: a link (socket + feed consumer) is
opened to each added middle; a removed middle's link sends its pending acks with credit 0
(nothing more is delivered to it) and closes. No batch is in hand at that point, so
nothing stored goes unacknowledged and nothing unacknowledged is forgotten: the middle
redelivers whatever it delivered and did not get acked.

Records that cannot be decoded are counted (``iotpipe_storage_rejected_records_total``),
logged once per delivery and acknowledged, so one bad record cannot stall the feed.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import zmq
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field

from iotpipe import lifecycle, wire
from iotpipe.curve import CurveKeyError, load_keys, secure_client
from iotpipe.endpoints import (
    EndpointsCollector,
    EndpointsError,
    EndpointsFile,
    diff_endpoints,
    resolve_endpoints,
)
from iotpipe.observability import ObservabilityServer, PortInUse, WSGIApp, setup_logging
from iotpipe.registry import RegistryWatcher
from iotpipe.settings import CommaList, ServerSettings, parse_settings, tier_config
from iotpipe.storage.consumer import FeedConsumer
from iotpipe.storage.enrich import enrich_records
from iotpipe.storage.readapi import HISTORY_PATH, HistoryApp
from iotpipe.storage.sinks import Sink, SinkBatch, SinkError, open_sink

__all__ = ["StorageMetrics", "StorageService", "StorageSettings", "main"]

log = logging.getLogger("iotpipe.storage")

_MAX_POLL_S = 0.25  # how long a stop request waits at most
_LINGER_MS = 2000  # time given to the last acks to leave at shutdown


class StorageSettings(ServerSettings):
    """Consume the middle tier's durable feed, enrich readings and write them to sinks."""

    model_config = tier_config("iotpipe storage", "IOTPIPE_STORAGE_")

    host: str = Field("0.0.0.0", description="bind address of the metrics port")
    metrics_port: int = Field(9102, ge=0, le=65535,
                              description="port of /metrics, /healthz and /readyz")
    feed_endpoints: CommaList = Field(
        default_factory=list,
        description="middle feed endpoints, comma separated (tcp://host:5557,...); "
                    "the feed of every one is consumed")
    feed_endpoints_file: str = Field(
        "", description="file listing the middle feed endpoints, one per line (key 'feed' of "
                        "the endpoints ConfigMap), re-read while running; wins over "
                        "--feed-endpoints when usable")
    endpoints_reload_seconds: float = Field(2.0, gt=0,
                                            description="seconds between endpoints file checks")
    group: str = Field("storage", min_length=1, description="consumer group name")
    consumer_id: str = Field(default_factory=socket.gethostname, min_length=1,
                             description="this consumer's id in the group (default: hostname)")
    sinks: CommaList = Field(
        default_factory=list,
        description="sink URLs, comma separated (sqlite:///path/readings.db, "
                    "victoriametrics://host:8428, parquet:///dir, akumuli://host:8282); "
                    "default: sqlite://<data-dir>/readings.db")
    registry_file: str = Field("/etc/iotpipe/registry/registry.yaml",
                               description="device registry YAML, reloaded when it changes; "
                                           "a missing file means every device is 'unknown'")
    data_dir: str = Field("/var/lib/iotpipe/store",
                          description="directory of the embedded default sink")
    window: int = Field(2000, ge=1, description="feed credit window: delivered but unacknowledged "
                                             "records each middle may send ahead")
    max_batch_records: int = Field(
        5000, ge=1, description="records written to the sinks in one go at most")
    heartbeat: float = Field(1.0, gt=0,
                             description="seconds between credit restatements to each middle")
    registry_interval: float = Field(2.0, gt=0,
                                     description="seconds between registry file checks")
    curve_keys_dir: str = Field(
        "", description="CurveZMQ keys directory (docs/security.md): feed links are then "
                        "encrypted, as the storage role; empty = no CURVE")

    read_api: bool = Field(False, description="serve GET /v1/history (recent readings of one "
                                              "device, from the store of record) on the "
                                              "metrics port, for the relay's live page")

    def sink_urls(self) -> list[str]:
        return self.sinks or [f"sqlite://{Path(self.data_dir).resolve()}/readings.db"]


class StorageMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.written = Counter("iotpipe_storage_records_written_total",
                               "Readings newly stored, per sink", ["sink"], registry=registry)
        self.duplicates = Counter("iotpipe_storage_duplicates_total",
                                  "Redelivered readings a sink already held", ["sink"],
                                  registry=registry)
        self.write_seconds = Histogram(
            "iotpipe_storage_write_seconds", "Duration of one durable sink write", ["sink"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry)
        self.write_errors = Counter("iotpipe_storage_write_errors_total",
                                    "Failed sink writes (retried)", ["sink"], registry=registry)
        self.rejected = Counter("iotpipe_storage_rejected_records_total",
                                "Feed records that could not be decoded (acked, not stored)",
                                registry=registry)
        self.deliveries = Counter("iotpipe_storage_deliveries_total",
                                  "Feed deliveries received", ["endpoint"], registry=registry)
        self.received = Counter("iotpipe_storage_records_received_total",
                                "Feed records received (redeliveries included)", ["endpoint"],
                                registry=registry)
        self.malformed = Counter("iotpipe_storage_malformed_messages_total",
                                 "Feed messages that did not follow the wire format",
                                 ["endpoint"], registry=registry)
        self.in_flight = Gauge("iotpipe_storage_in_flight_records",
                               "Records delivered and not yet acknowledged", ["endpoint"],
                               registry=registry)
        self.lag = Gauge("iotpipe_storage_feed_lag_seconds",
                         "Age (since ingest received it) of the newest reading stored",
                         ["endpoint"], registry=registry)
        self.last_acked = Gauge("iotpipe_storage_last_acked_seq",
                                "Highest middle log seq acknowledged", ["endpoint"],
                                registry=registry)


@dataclass
class _Link:
    endpoint: str
    sock: zmq.Socket[bytes]
    consumer: FeedConsumer


class StorageService:
    """The storage loop; ``run()`` blocks until ``stop()`` (safe from a signal handler)."""

    def __init__(
        self,
        settings: StorageSettings,
        sinks: Sequence[Sink],
        registry: RegistryWatcher,
        metrics: StorageMetrics,
        endpoints: Sequence[str] | None = None,
        endpoints_file: EndpointsFile | None = None,
    ) -> None:
        feed_endpoints = list(settings.feed_endpoints if endpoints is None else endpoints)
        if not feed_endpoints:
            raise ValueError("no feed endpoints configured (--feed-endpoints tcp://host:5557)")
        self.settings = settings
        self.sinks = list(sinks)
        self.registry = registry
        self.metrics = metrics
        self.endpoints_file = endpoints_file
        self.sinks_healthy = True
        self._stop = threading.Event()
        self._curve_keys = (load_keys(settings.curve_keys_dir, "storage")
                            if settings.curve_keys_dir else None)
        self._ctx = zmq.Context()
        self._links: list[_Link] = []
        for endpoint in feed_endpoints:
            try:
                self._links.append(self._open_link(endpoint))
            except ValueError:
                self.close()
                raise

    @property
    def endpoints(self) -> list[str]:
        return [link.endpoint for link in self._links]

    def _open_link(self, endpoint: str) -> _Link:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, _LINGER_MS)
        # Requests queued while a middle is away are stale heartbeats; keep few.
        sock.setsockopt(zmq.SNDHWM, 64)
        sock.setsockopt(zmq.RCVHWM, 256)
        if self._curve_keys is not None:
            secure_client(sock, self._curve_keys)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise ValueError(f"feed endpoint {endpoint!r}: {exc}") from None
        consumer = FeedConsumer(self.settings.group, self.settings.consumer_id,
                                window=self.settings.window, heartbeat_s=self.settings.heartbeat)
        return _Link(endpoint, sock, consumer)

    def set_endpoints(self, endpoints: Sequence[str], poller: zmq.Poller) -> None:
        """Open links to added middles; close removed ones after their last acks (credit
        0). Called between batches, so no delivery is in hand."""
        diff = diff_endpoints(self.endpoints, endpoints)
        for link in [link for link in self._links if link.endpoint in diff.removed]:
            self._send(link, link.consumer.final_request())
            poller.unregister(link.sock)
            link.sock.close()  # LINGER lets the last acks leave
            self._links.remove(link)
            self.metrics.in_flight.labels(link.endpoint).set(0)
        for endpoint in diff.added:
            try:
                link = self._open_link(endpoint)
            except ValueError as exc:  # validated already; a bad one is skipped, not fatal
                log.error("feed endpoint not usable", extra={"fields": {"error": str(exc)}})
                continue
            poller.register(link.sock, zmq.POLLIN)
            self._links.append(link)
        log.info("feed endpoints changed", extra={"fields": {
            "added": list(diff.added), "removed": list(diff.removed)}})

    @property
    def ready(self) -> bool:
        return self.sinks_healthy and not self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def _send(self, link: _Link, frames: list[bytes]) -> None:
        # zmq.Again: the middle is unreachable and the queue is full. Lost acks only mean
        # redelivery (stored as duplicates); the next heartbeat restates credit.
        with contextlib.suppress(zmq.Again):
            link.sock.send_multipart(frames, flags=zmq.NOBLOCK)

    def run(self) -> int:
        poller = zmq.Poller()
        for link in self._links:
            poller.register(link.sock, zmq.POLLIN)
        start = 0
        exit_code = 0
        reload_s = self.settings.endpoints_reload_seconds
        next_check = time.monotonic() + reload_s
        while not self._stop.is_set():
            now = time.monotonic()
            if self.endpoints_file is not None and now >= next_check:
                next_check = now + reload_s
                changed = self.endpoints_file.check()
                if changed is not None:
                    self.set_endpoints(changed, poller)
                    start = 0
            if not self._links:  # every new endpoint failed to open: wait for the next list
                self._stop.wait(_MAX_POLL_S)
                continue
            for link in self._links:
                if link.consumer.request_due(now):
                    self._send(link, link.consumer.make_request(now))
            wait_s = min(min(link.consumer.seconds_until_due(now) for link in self._links),
                         _MAX_POLL_S)
            events = dict(poller.poll(int(wait_s * 1000) + 1))
            if not events:
                continue
            deliveries: list[tuple[_Link, wire.Records]] = []
            total = 0
            # Rotate the starting socket so that one busy middle cannot starve another.
            order = self._links[start:] + self._links[:start]
            start = (start + 1) % len(self._links)
            for link in order:
                if link.sock not in events:
                    continue
                total += self._drain(link, deliveries,
                                     self.settings.max_batch_records - total)
            if deliveries and not self._process(deliveries):
                exit_code = 1
                break
        for link in self._links:
            self._send(link, link.consumer.final_request())
        return exit_code

    def _drain(self, link: _Link, out: list[tuple[_Link, wire.Records]], budget: int) -> int:
        taken = 0
        while taken < budget:
            try:
                frames = link.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                delivery = link.consumer.on_frames(frames)
            except wire.WireError as exc:
                self.metrics.malformed.labels(link.endpoint).inc()
                log.warning("malformed feed message ignored",
                            extra={"fields": {"endpoint": link.endpoint, "error": str(exc)}})
                continue
            if delivery is None:
                continue
            out.append((link, delivery))
            taken += len(delivery.records)
            self.metrics.deliveries.labels(link.endpoint).inc()
            self.metrics.received.labels(link.endpoint).inc(len(delivery.records))
        self.metrics.in_flight.labels(link.endpoint).set(link.consumer.in_hand)
        return taken

    def _process(self, deliveries: list[tuple[_Link, wire.Records]]) -> bool:
        """Enrich, write to every sink, then ack. False if given up (stop while failing)."""
        registry = self.registry.current
        batches: list[SinkBatch] = []
        newest_received_ns: dict[str, int] = {}
        for link, delivery in deliveries:
            readings, rejected = enrich_records(delivery.first, delivery.records, registry)
            if rejected:
                self.metrics.rejected.inc(len(rejected))
                log.warning("undecodable feed records acknowledged without storing", extra={
                    "fields": {"endpoint": link.endpoint, "middle": delivery.middle,
                               "count": len(rejected), "first_seq": rejected[0].seq,
                               "reason": rejected[0].reason}})
            if readings:
                batches.append(SinkBatch(delivery.middle, delivery.first, readings))
                newest = max(r.received_ns for r in readings)
                if newest > newest_received_ns.get(link.endpoint, 0):
                    newest_received_ns[link.endpoint] = newest
        if batches:
            for sink in self.sinks:
                if not self._write_until_done(sink, batches):
                    for link, delivery in deliveries:
                        link.consumer.abandon(delivery)
                    log.error("stopping while a sink is failing: the batch in hand is not "
                              "acknowledged and will be redelivered",
                              extra={"fields": {"sink": sink.url}})
                    return False
        now_ns = time.time_ns()
        for link, delivery in deliveries:
            link.consumer.stored(delivery)
        for link in {link.endpoint: link for link, _ in deliveries}.values():
            self._send(link, link.consumer.make_request(time.monotonic()))
            self.metrics.in_flight.labels(link.endpoint).set(link.consumer.in_hand)
            self.metrics.last_acked.labels(link.endpoint).set(link.consumer.last_acked)
            if link.endpoint in newest_received_ns:
                lag_s = max(0.0, (now_ns - newest_received_ns[link.endpoint]) / 1e9)
                self.metrics.lag.labels(link.endpoint).set(lag_s)
        return True

    def _write_until_done(self, sink: Sink, batches: list[SinkBatch]) -> bool:
        backoff_s = 0.1
        while True:
            started = time.perf_counter()
            try:
                result = sink.write(batches)
            except SinkError as exc:
                self.metrics.write_errors.labels(sink.kind).inc()
                self.sinks_healthy = False
                log.error("sink write failed; retrying",
                          extra={"fields": {"sink": sink.url, "error": str(exc),
                                            "retry_s": backoff_s}})
                if self._stop.wait(backoff_s):
                    return False
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            self.metrics.write_seconds.labels(sink.kind).observe(time.perf_counter() - started)
            self.metrics.written.labels(sink.kind).inc(result.written)
            if result.duplicates:
                self.metrics.duplicates.labels(sink.kind).inc(result.duplicates)
            if not self.sinks_healthy:
                log.info("sink write succeeded again", extra={"fields": {"sink": sink.url}})
                self.sinks_healthy = True
            return True

    def close(self) -> None:
        for link in self._links:
            link.sock.close()
        self._ctx.term()


def open_sinks(urls: Sequence[str], state_dir: Path | None = None) -> list[Sink]:
    sinks: list[Sink] = []
    try:
        for url in urls:
            sinks.append(open_sink(url, state_dir=state_dir))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks


def _read_routes(settings: StorageSettings) -> dict[str, WSGIApp]:
    """The read API over the first readable sink (the store of record), when asked for."""
    if not settings.read_api:
        return {}
    readable = [url for url in settings.sink_urls() if url.startswith(("sqlite:", "parquet:"))]
    return {HISTORY_PATH: HistoryApp(readable[0])} if readable else {}


def main(argv: Sequence[str]) -> int:
    """``iotpipe storage``: run until SIGTERM/SIGINT, finish the batch in hand, exit 0."""
    lifecycle.catch_early()  # a stop while the sinks open counts
    settings = parse_settings(StorageSettings, argv)
    setup_logging("storage", settings.log_level)
    if not settings.feed_endpoints and not settings.feed_endpoints_file:
        print("iotpipe storage: error: --feed-endpoints: no feed endpoint configured "
              "(e.g. tcp://127.0.0.1:5557)", file=sys.stderr)
        return 2
    if settings.curve_keys_dir:
        try:
            load_keys(settings.curve_keys_dir, "storage")
        except CurveKeyError as exc:
            print(f"iotpipe storage: error: --curve-keys-dir: {exc}", file=sys.stderr)
            return 2
    try:
        sinks = open_sinks(settings.sink_urls(), state_dir=Path(settings.data_dir))
    except SinkError as exc:
        print(f"iotpipe storage: error: --sinks: {exc}", file=sys.stderr)
        return 2
    registry = RegistryWatcher(settings.registry_file, interval_s=settings.registry_interval)
    try:
        endpoints, watched = resolve_endpoints(
            "--feed-endpoints", settings.feed_endpoints,
            "--feed-endpoints-file", settings.feed_endpoints_file)
    except EndpointsError as exc:
        for sink in sinks:
            sink.close()
        print(f"iotpipe storage: error: {exc}", file=sys.stderr)
        return 2
    if watched is not None:
        REGISTRY.register(EndpointsCollector({"feed": watched}))
    try:
        service = StorageService(settings, sinks, registry, StorageMetrics(), endpoints,
                                 watched)
    except ValueError as exc:
        for sink in sinks:
            sink.close()
        print(f"iotpipe storage: error: --feed-endpoints: {exc}", file=sys.stderr)
        return 2

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if lifecycle.requested():
        service.stop()  # stopped while starting: run() returns at once
    try:
        observability = ObservabilityServer(settings.host, settings.metrics_port,
                                            ready=lambda: service.ready,
                                            routes=_read_routes(settings)).start()
    except PortInUse as exc:
        service.close()
        for sink in sinks:
            sink.close()
        print(f"iotpipe storage: error: {exc}", file=sys.stderr)
        return 1
    log.info("storage started", extra={"fields": {
        "feed_endpoints": service.endpoints, "group": settings.group,
        "consumer_id": settings.consumer_id, "sinks": [s.url for s in sinks],
        "registry_file": settings.registry_file}})
    try:
        exit_code = service.run()
    finally:
        service.close()
        for sink in sinks:
            sink.close()
        observability.stop()
    log.info("storage stopped", extra={"fields": {"exit_code": exit_code}})
    return exit_code
