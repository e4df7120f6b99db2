"""``iotpipe storage``: the I/O shell around the feed consumer (``core``), enrichment and sinks.

One thread owns the feed: a DEALER socket per middle feed endpoint, the registry watcher and
the store of record (the embedded SQLite sink). The loop restates credit (heartbeat), polls
every socket, drains what has arrived (up to ``max_batch_records``), enriches it, writes it
to the store of record (one transaction for all deliveries that arrived together: group
commit) and only then acknowledges each delivery to the middle it came from. So an
acknowledged record is durable in the store of record, and a record that was written but
not acknowledged (SIGKILL between the two) is redelivered and ignored as a duplicate.

Every other sink tails the store of record on a thread of its own with its own durable
cursor (``iotpipe.storage.tail``): a sink that is down, refusing or slow holds up neither
the feed nor the other sinks, and catches up when it recovers. Its lag and state are
metrics (``iotpipe_storage_sink_*``) and lines of the ``/readyz`` body.

A store-of-record write that fails is retried with backoff; the tier is not ready
meanwhile (a failing tailing sink does not make it unready: it is reported in the
``/readyz`` detail and ``iotpipe_storage_sink_up``). SIGTERM or SIGINT lets the batch in
hand finish and be acknowledged, sends the last acks with credit 0, stops the sink threads
(a range a sink was writing is rewritten at the next start) and exits 0. If the store is
failing at that moment, the unacknowledged batch is given up (the middle redelivers it) and
the exit status is 1.

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
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq
from prometheus_client import REGISTRY

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
from iotpipe.settings import parse_settings
from iotpipe.storage.core import FeedConsumer, WriteBackoff, listed_twice
from iotpipe.storage.enrich import enrich_records
from iotpipe.storage.metrics import StorageMetrics
from iotpipe.storage.readapi import HISTORY_PATH, HistoryApp
from iotpipe.storage.settings import StorageSettings
from iotpipe.storage.sinks import Sink, SinkBatch, SinkError, open_sink
from iotpipe.storage.sinks.sqlite import SqliteSink
from iotpipe.storage.tail import SinkWorker, cursor_key

__all__ = ["StorageMetrics", "StorageServer", "StorageSettings", "main"]

log = logging.getLogger("iotpipe.storage")

_MAX_POLL_S = 0.25  # how long a stop request waits at most
_LINGER_MS = 2000  # time given to the last acks to leave at shutdown
_PRUNE_INTERVAL_S = 10.0


@dataclass
class _Link:
    endpoint: str
    sock: zmq.Socket[bytes]
    consumer: FeedConsumer


class StorageServer:
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
        if not sinks or not isinstance(sinks[0], SqliteSink):
            raise ValueError("--sinks: the first sink must be the store of record (sqlite://)")
        twice = listed_twice([cursor_key(sink.url) for sink in sinks])
        if twice:
            raise ValueError(f"--sinks: sink(s) listed twice: {', '.join(twice)}")
        self.settings = settings
        self.store: SqliteSink = sinks[0]
        self.sinks = list(sinks)
        self.workers = [SinkWorker(sink, self.store.path, metrics.tail,
                                   batch_rows=settings.sink_batch_rows) for sink in sinks[1:]]
        self._next_prune = 0.0
        self.registry = registry
        self.metrics = metrics
        metrics.watch_sinks(self.sinks)
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

    def readiness(self) -> tuple[bool, str]:
        """Ready (the store of record takes writes) and one line per sink for ``/readyz``."""
        lines = [f"sink {self.store.url}: store of record, "
                 f"{'ok' if self.sinks_healthy else 'failing'}"]
        lines += [worker.state.describe() for worker in self.workers]
        return self.ready, "\n".join(lines)

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
        for worker in self.workers:
            worker.start()
        reload_s = self.settings.endpoints_reload_seconds
        next_check = time.monotonic() + reload_s
        while not self._stop.is_set():
            now = time.monotonic()
            if self.settings.store_retention and now >= self._next_prune:
                self._next_prune = now + min(_PRUNE_INTERVAL_S, self.settings.store_retention)
                self._prune()
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
        for worker in self.workers:
            worker.stop()
        return exit_code

    def _prune(self) -> None:
        """Drop readings every sink holds that are older than ``store_retention``."""
        cutoff_ns = time.time_ns() - int(self.settings.store_retention * 1e9)
        upto = min((worker.state.done for worker in self.workers), default=None)
        try:
            removed = self.store.prune(upto, cutoff_ns)
        except SinkError as exc:
            log.warning("pruning the store of record failed",
                        extra={"fields": {"error": str(exc)}})
            return
        if removed:
            self.metrics.pruned.inc(removed)

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
        """Enrich, write to the store of record, wake the tailing sinks, then ack.

        False if given up (stop while the store is failing)."""
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
            if not self._write_until_done(self.store, batches):
                for link, delivery in deliveries:
                    link.consumer.abandon(delivery)
                log.error("stopping while the store of record is failing: the batch in hand "
                          "is not acknowledged and will be redelivered",
                          extra={"fields": {"sink": self.store.url}})
                return False
            for worker in self.workers:
                worker.wake.set()
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
        backoff = WriteBackoff()
        while True:
            started = time.perf_counter()
            try:
                result = sink.write(batches)
            except SinkError as exc:
                self.metrics.write_errors.labels(sink.kind).inc()
                self.sinks_healthy = False
                delay = backoff.next_delay()
                log.error("sink write failed; retrying",
                          extra={"fields": {"sink": sink.url, "error": str(exc),
                                            "retry_s": delay}})
                if self._stop.wait(delay):
                    return False
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
        for worker in self.workers:
            worker.stop()
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
        service = StorageServer(settings, sinks, registry, StorageMetrics(), endpoints,
                                 watched)
    except ValueError as exc:
        for sink in sinks:
            sink.close()
        print(f"iotpipe storage: error: {exc}", file=sys.stderr)  # names the setting
        return 2

    lifecycle.on_stop(lambda _signum: service.stop())  # early: run() returns at once
    try:
        observability = ObservabilityServer(settings.host, settings.metrics_port,
                                            ready=service.readiness,
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
