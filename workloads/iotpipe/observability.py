"""Metrics, health and structured logs, shared by every tier.

Each tier serves ``/metrics`` (Prometheus text format), ``/healthz`` (the process is alive)
and ``/readyz`` on its metrics port. The server runs in a daemon thread so that a busy event
loop never makes a scrape or a probe time out.

``/readyz`` answers 200 when the tier can take the work a Service would send it *now*, and
that is decided per tier by what the tier itself needs, not by whether every upstream is up:

- ingest: its queue is open, its WebSocket port listens, its forwarder has not failed and it
  is not draining. A middle tier that is down does **not** make ingest unready: devices keep
  being acknowledged into the durable queue, which is forwarded once the middle is back
  (taking every ingest pod out of its Service during a middle restart would refuse devices
  for nothing). Forwarding lag shows in ``iotpipe_queue_depth_records``.
- middle: its log is open and its three sockets are bound.
- storage: every sink is healthy and it is not stopping. A middle that is down means no
  deliveries, not a broken storage pod (its feed lag shows on the middle's metrics).
- relay: its WebSocket port listens and at least one middle PUB endpoint is connected (a
  relay with no upstream would accept clients and send them nothing).

A pod that runs several processes serves one endpoint for all of them: its parent scrapes
each process's private endpoint and ``merge_scrapes`` sums them into pod totals.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "ObservabilityServer",
    "PortInUse",
    "QueueDepthCollector",
    "merge_scrapes",
    "setup_logging",
]

# Families summed across a pod's processes; anything else (the client library's process_*
# and python_* families: start time, memory, GC) is kept per process with a label.
SUMMED_PREFIX = "iotpipe_"
PROCESS_LABEL = "process"


def merge_scrapes(scrapes: Mapping[str, str]) -> list[Metric]:
    """Merge the Prometheus text scrapes of a pod's processes (``{process: text}``).

    ``iotpipe_*`` samples with the same name and labels are added up: connection gauges,
    counters, histogram buckets and queue depths become pod totals (``_created`` samples,
    timestamps, take the earliest). Other families get a ``process`` label instead.
    Pure: no I/O, so it is tested on strings.
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for process, text in scrapes.items():
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
                values[family.name] = {}
            sums = values[family.name]
            summed = family.name.startswith(SUMMED_PREFIX)
            for sample in family.samples:
                labels = dict(sample.labels)
                if not summed:
                    labels[PROCESS_LABEL] = process
                key = (sample.name, tuple(sorted(labels.items())))
                if key not in sums:
                    sums[key] = sample.value
                elif sample.name.endswith("_created"):
                    sums[key] = min(sums[key], sample.value)
                else:
                    sums[key] += sample.value
    for name, merged in families.items():
        for (sample_name, labels), value in values[name].items():
            merged.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _server_class(host: str) -> type[ThreadingWSGIServer]:
    """The WSGI server class for ``host``: IPv6 literals (``::``, ``::1``) need AF_INET6."""
    if ":" not in host:
        return ThreadingWSGIServer

    class _ThreadingWSGIServerV6(ThreadingWSGIServer):
        address_family = socket.AF_INET6

    return _ThreadingWSGIServerV6


class PortInUse(OSError):
    """A port this process must bind is taken (another instance, or another tier)."""

    def __init__(self, what: str, host: str, port: int) -> None:
        super().__init__(errno.EADDRINUSE, f"{what} port {port} on {host} is in use")

    def __str__(self) -> str:
        return str(self.strerror)


class ObservabilityServer:
    """Serves /metrics, /healthz and /readyz from a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        ready: Callable[[], bool] = lambda: True,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._ready = ready
        self._metrics_app = make_wsgi_app(registry)
        try:
            self._server = make_server(
                host, port, self._app, server_class=_server_class(host),
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse("metrics", host, port) from None
            raise
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="observability", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            try:
                ok = bool(self._ready())
            except Exception:  # a failing probe means "not ready", never a crash
                ok = False
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain")])
            return [b"ready\n" if ok else b"not ready\n"]
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    def start(self) -> ObservabilityServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class QueueDepthCollector:
    """Exposes the depth and capacity of named queues, read at scrape time.

    ``sources`` maps a queue name to a callable returning ``(records, bytes, capacity)``.
    Reading at scrape time keeps the per-message path free of metric updates.
    """

    def __init__(self, tier: str, sources: dict[str, Callable[[], tuple[int, int, int]]]) -> None:
        self._tier = tier
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily]:
        records = GaugeMetricFamily(
            "iotpipe_queue_depth_records", "Records not yet acknowledged by every consumer",
            labels=["tier", "queue"],
        )
        size = GaugeMetricFamily(
            "iotpipe_queue_depth_bytes", "Bytes not yet acknowledged by every consumer",
            labels=["tier", "queue"],
        )
        capacity = GaugeMetricFamily(
            "iotpipe_queue_capacity_bytes", "Configured queue capacity in bytes",
            labels=["tier", "queue"],
        )
        for name, source in self._sources.items():
            n_records, n_bytes, n_capacity = source()
            records.add_metric([self._tier, name], n_records)
            size.add_metric([self._tier, name], n_bytes)
            capacity.add_metric([self._tier, name], n_capacity)
        yield records
        yield size
        yield capacity


class _JsonFormatter(logging.Formatter):
    def __init__(self, tier: str) -> None:
        super().__init__()
        self._tier = tier

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "tier": self._tier,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(tier: str, level: str = "info", json: bool = True) -> None:
    """Structured (JSON lines) logs on stderr. Pass extra fields as ``extra={"fields": {...}}``."""
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(_JsonFormatter(tier))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {tier} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
