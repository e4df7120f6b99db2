"""Metrics, health and structured logs, shared by every tier.

Each tier serves ``/metrics`` (Prometheus text format), ``/healthz`` (the process is alive)
and ``/readyz`` (the tier can do its job now: queue open, upstreams reachable, not
draining) on its metrics port. The server runs in a daemon thread so that a busy event
loop never makes a scrape or a probe time out.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

__all__ = [
    "ObservabilityServer",
    "QueueDepthCollector",
    "setup_logging",
]


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


class ObservabilityServer:
    """Serves /metrics, /healthz and /readyz from a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        # bool, or (bool, detail): the detail lines follow "ready"/"not ready" in the body.
        ready: Callable[[], bool | tuple[bool, str]] = lambda: True,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._ready = ready
        self._metrics_app = make_wsgi_app(registry)
        self._server = make_server(
            host, port, self._app, server_class=_server_class(host), handler_class=_QuietHandler
        )
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
            detail = ""
            try:
                answer = self._ready()
                ok, detail = answer if isinstance(answer, tuple) else (bool(answer), "")
            except Exception:  # a failing probe means "not ready", never a crash
                ok = False
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain")])
            body = "ready\n" if ok else "not ready\n"
            return [(body + (detail.rstrip("\n") + "\n" if detail else "")).encode()]
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
