"""The live fleet page the relay serves at ``/``, and the small JSON API behind it.

The page (``static/``: plain HTML, CSS and JavaScript plus a vendored uPlot build; no build
step, no CDN) opens ``/v1/live`` on the same port with the client token it was given in
``?token=``, subscribes to every device and draws the fleet. Next to the WebSocket it uses
three GET endpoints on the same origin, each taking the same token:

``/api/devices?ids=a,b``  class, location and labels of devices from the relay's registry
``/api/registry``       every device the registry lists by exact id, so the page shows the
                        ones that are silent (stale) too, not only those that send
``/api/history?device=ID&limit=N``  recent readings of one device, read from the storage
                        tier's read API (``--history-urls``): storage holds the store of
                        record, the relay only sees readings that pass while it runs
``/api/health``         queue depth and fill, lag and rates of every tier, from their
                        ``/metrics`` (``--health-urls tier=URL``) plus the relay's own

The decisions (routing, token check, parsing scrapes, merging history) are plain functions
tested without sockets; :class:`WebFront` is the thin shell the relay's HTTP handshake
hook calls for every plain HTTP request (no ``Upgrade``) to a path other than ``/v1/live``.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources

import orjson
from prometheus_client.parser import text_string_to_metric_families
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from iotpipe.auth import CLIENT_AUDIENCE, AuthError, bearer_token, verify_token
from iotpipe.registry import DeviceInfo

__all__ = [
    "MAX_HISTORY",
    "MAX_LOOKUP_IDS",
    "StaticFile",
    "WebFront",
    "check_token",
    "device_payload",
    "load_static",
    "merge_history",
    "parse_health_targets",
    "registry_payload",
    "summarize_health",
]

# Static files by URL path: (file under static/, content type).
_STATIC: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
    "/static/vendor/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js",
                                         "text/javascript; charset=utf-8"),
    "/static/vendor/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "/static/vendor/uPlot.LICENSE": ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
}
# The page loads only its own files and talks only to its own origin.
_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self' ws: wss:; base-uri 'none'; "
        "frame-ancestors 'none'")
MAX_LOOKUP_IDS = 200  # ids per /api/devices request (keeps the request line short)
MAX_HISTORY = 5000  # readings per /api/history answer
MAX_REGISTRY = 50_000  # devices per /api/registry answer (the rest: "truncated")
_DEFAULT_HISTORY = 600
_FETCH_TIMEOUT_S = 2.0
_HEALTH_CACHE_S = 1.0  # many open pages cost one scrape per tier per second


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_static() -> dict[str, StaticFile]:
    """Every file of the page, read once from the installed package."""
    root = resources.files("iotpipe.relay") / "static"
    files: dict[str, StaticFile] = {}
    for path, (name, content_type) in _STATIC.items():
        node = root
        for part in name.split("/"):
            node = node / part
        body = node.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        files[path] = StaticFile(body, content_type, etag)
    return files


# -- pure decisions ----------------------------------------------------------------------


def check_token(secret: bytes | None, authorization: str | None,
                query: Mapping[str, list[str]]) -> str:
    """The client id of a request, or AuthError; no secret means no check (insecure mode)."""
    if secret is None:
        return "anonymous"
    token = bearer_token(authorization) if authorization else (query.get("token") or [""])[0]
    if not token:
        raise AuthError("missing", "no Authorization header or token parameter")
    return verify_token(secret, token, CLIENT_AUDIENCE)


def parse_health_targets(entries: Iterable[str]) -> dict[str, str]:
    """``tier=http://host:port/metrics`` entries as ``{tier: url}``; ValueError names a bad
    one."""
    targets: dict[str, str] = {}
    for entry in entries:
        tier, sep, url = entry.partition("=")
        tier = tier.strip()
        url = url.strip()
        parsed = urllib.parse.urlsplit(url)
        if not sep or not tier or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"health URL {entry!r}: expected TIER=http://host:port/metrics")
        if tier in targets:
            raise ValueError(f"health URL {entry!r}: tier {tier!r} given twice")
        targets[tier] = url
    return targets


def device_payload(ids: Sequence[str], lookup: Callable[[str], DeviceInfo | None]
                   ) -> dict[str, object]:
    """Registry attributes of ``ids`` (unknown devices get class/location ``unknown``)."""
    devices: dict[str, object] = {}
    for device_id in ids:
        info = lookup(device_id)
        if info is None:
            devices[device_id] = {"class": "unknown", "location": "unknown", "labels": {}}
        else:
            devices[device_id] = {"class": info.device_class, "location": info.location,
                                  "labels": dict(info.labels)}
    return {"devices": devices}


def registry_payload(devices: Mapping[str, DeviceInfo], limit: int = MAX_REGISTRY
                     ) -> dict[str, object]:
    """The registry's exact-id devices (the first ``limit`` by id) for the page's fleet."""
    ids = sorted(devices)
    return {"devices": {device_id: {"class": devices[device_id].device_class,
                                    "location": devices[device_id].location,
                                    "labels": dict(devices[device_id].labels)}
                        for device_id in ids[:limit]},
            "truncated": len(ids) > limit}


def merge_history(device: str, answers: Sequence[Mapping[str, object]], limit: int
                  ) -> dict[str, object]:
    """One device's readings from several storage read APIs: by time, each message once
    (a device's message id is its identity), the newest ``limit`` kept."""
    seen: dict[str, Mapping[str, object]] = {}
    for answer in answers:
        readings = answer.get("readings")
        if not isinstance(readings, list):
            continue
        for reading in readings:
            if isinstance(reading, dict) and isinstance(reading.get("ts_ns"), int):
                seen[str(reading.get("id"))] = reading
    ordered = sorted(seen.values(), key=lambda r: (r["ts_ns"], str(r.get("id"))))  # type: ignore[arg-type,return-value]
    return {"device": device, "readings": ordered[-limit:] if limit else []}


# Per tier: the scalar numbers the page shows (sum over label sets), by metric sample name.
_HEALTH_SCALARS: dict[str, tuple[str, ...]] = {
    "ingest": ("iotpipe_ingest_connections", "iotpipe_ingest_messages_accepted_total",
               "iotpipe_ingest_busy_total", "iotpipe_forwarder_in_flight_records",
               "iotpipe_forwarder_records_acked_total"),
    "middle": ("iotpipe_middle_feed_lag_records", "iotpipe_middle_feed_consumers",
               "iotpipe_middle_log_tail_seq"),
    "storage": ("iotpipe_storage_records_written_total", "iotpipe_storage_in_flight_records",
                "iotpipe_storage_write_errors_total", "iotpipe_storage_duplicates_total"),
    "relay": ("iotpipe_relay_clients", "iotpipe_relay_events_in_total",
              "iotpipe_relay_dropped_total", "iotpipe_relay_upstream_missed_total"),
}
# Taken as the largest over label sets (a lag is as bad as its worst endpoint).
_HEALTH_MAX = {"storage": ("iotpipe_storage_feed_lag_seconds",)}
# Latency histograms shown as p50/p99, by the key they get in a tier's summary.
_HISTOGRAMS = {"iotpipe_ingest_ack_seconds_bucket": "ack_seconds",
               "iotpipe_storage_write_seconds_bucket": "write_seconds"}


def _histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style quantile from cumulative ``(le, count)`` buckets (linear inside)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    previous_le, previous_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return previous_le
            span = count - previous_count
            inside = (rank - previous_count) / span if span else 0.0
            return previous_le + (le - previous_le) * inside
        previous_le, previous_count = le, count
    return previous_le


def _latency(buckets: dict[float, float], before: object) -> dict[str, object]:
    """p50/p99 of the samples since ``before`` (the previous view's buckets of the same
    histogram) when there are new ones, else of every sample since the process started."""
    window = "since start"
    current = sorted(buckets.items())
    if isinstance(before, dict) and isinstance(before.get("buckets"), list):
        old = {float(le): float(count) for le, count in before["buckets"]}
        delta = [(le, count - old.get(le, 0.0)) for le, count in current]
        # A restarted process counts from zero again: then the deltas mean nothing.
        if delta and delta[-1][1] > 0 and all(d >= 0 for _, d in delta):
            current, window = delta, "recent"
    return {"p50": _histogram_quantile(current, 0.5), "p99": _histogram_quantile(current, 0.99),
            "window": window,
            "buckets": [[le, count] for le, count in sorted(buckets.items())]}


def summarize_health(scrapes: Mapping[str, str | None],
                     previous: Mapping[str, object] | None = None) -> dict[str, object]:
    """The page's health view from each tier's ``/metrics`` text (None: scrape failed).

    Per tier: ``up``, its queues (records, bytes, capacity, fill 0..1, from
    ``iotpipe_queue_depth_*``), the scalars above, and ingest's ack and storage's write
    latency (p50/p99 since the ``previous`` view, when given). Totals stay totals: the page
    turns successive answers into rates.
    """
    previous_tiers = (previous or {}).get("tiers")
    if not isinstance(previous_tiers, dict):
        previous_tiers = {}
    tiers: dict[str, object] = {}
    for tier, text in scrapes.items():
        if text is None:
            tiers[tier] = {"up": False}
            continue
        queues: dict[tuple[str, str], dict[str, float]] = {}
        scalars: dict[str, float] = {}
        maxima: dict[str, float] = {}
        histograms: dict[str, dict[float, float]] = {}
        wanted = set(_HEALTH_SCALARS.get(tier, ()))
        wanted_max = set(_HEALTH_MAX.get(tier, ()))
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            tiers[tier] = {"up": False, "error": "unreadable metrics"}
            continue
        for family in families:
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, float(sample.value)
                if name in ("iotpipe_queue_depth_records", "iotpipe_queue_depth_bytes",
                            "iotpipe_queue_capacity_bytes"):
                    key = (labels.get("tier", tier), labels.get("queue", ""))
                    field = {"iotpipe_queue_depth_records": "records",
                             "iotpipe_queue_depth_bytes": "bytes",
                             "iotpipe_queue_capacity_bytes": "capacity"}[name]
                    queue = queues.setdefault(key, {})
                    queue[field] = queue.get(field, 0.0) + value
                elif name in wanted:
                    scalars[name] = scalars.get(name, 0.0) + value
                elif name in wanted_max:
                    maxima[name] = max(maxima.get(name, value), value)
                elif name in _HISTOGRAMS:
                    buckets = histograms.setdefault(_HISTOGRAMS[name], {})
                    le = float(labels.get("le", "inf"))
                    buckets[le] = buckets.get(le, 0.0) + value
        queue_list = []
        for (queue_tier, queue_name), q in sorted(queues.items()):
            capacity = q.get("capacity", 0.0)
            queue_list.append({
                "tier": queue_tier, "queue": queue_name, "records": q.get("records", 0.0),
                "bytes": q.get("bytes", 0.0), "capacity": capacity,
                "fill": (q.get("bytes", 0.0) / capacity) if capacity else None})
        summary: dict[str, object] = {"up": True, "queues": queue_list,
                                      "metrics": {**scalars, **maxima}}
        before = previous_tiers.get(tier)
        for key, buckets in histograms.items():
            summary[key] = _latency(buckets, before.get(key) if isinstance(before, dict)
                                    else None)
        tiers[tier] = summary
    return {"tiers": tiers}


# -- the shell ---------------------------------------------------------------------------


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_S) as answer:
        return bytes(answer.read())


def _json_response(status: HTTPStatus, body: object) -> Response:
    data = orjson.dumps(body)
    headers = Headers([
        ("Date", email.utils.formatdate(usegmt=True)),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(data))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Connection", "close"),
    ])
    return Response(status.value, status.phrase, headers, data)


def _error(status: HTTPStatus, reason: str, detail: str) -> Response:
    return _json_response(status, {"error": reason, "detail": detail})


class WebFront:
    """Answers every HTTP request to the relay's port other than ``/v1/live``."""

    def __init__(self, secret: bytes | None, lookup: Callable[[str], DeviceInfo | None],
                 history_urls: Sequence[str], health_targets: Mapping[str, str],
                 own_metrics: Callable[[], str],
                 registered: Callable[[], Mapping[str, DeviceInfo]] = dict) -> None:
        self.secret = secret
        self.lookup = lookup
        self.registered = registered
        self.history_urls = [url.rstrip("/") for url in history_urls]
        self.health_targets = dict(health_targets)
        self.own_metrics = own_metrics
        self.files = load_static()
        self._health: tuple[float, dict[str, object]] | None = None
        self._health_lock = asyncio.Lock()

    async def respond(self, request: Request) -> Response:
        url = urllib.parse.urlsplit(request.path)
        path = url.path
        static = self.files.get(path)
        if static is not None:
            return self._static(static, request)
        if not path.startswith("/api/"):
            return _error(HTTPStatus.NOT_FOUND, "not_found",
                          f"no page at {path}; the live page is / and the WebSocket /v1/live")
        query = urllib.parse.parse_qs(url.query)
        try:
            check_token(self.secret, request.headers.get("Authorization"), query)
        except AuthError as exc:
            return _error(HTTPStatus.UNAUTHORIZED, exc.reason, exc.detail or exc.reason)
        if path == "/api/devices":
            ids = [i for part in query.get("ids", []) for i in part.split(",") if i]
            if len(ids) > MAX_LOOKUP_IDS:
                return _error(HTTPStatus.BAD_REQUEST, "too_many_ids",
                              f"{len(ids)} ids, at most {MAX_LOOKUP_IDS} per request")
            return _json_response(HTTPStatus.OK, device_payload(ids, self.lookup))
        if path == "/api/registry":
            return _json_response(HTTPStatus.OK, registry_payload(self.registered()))
        if path == "/api/history":
            return await self._history(query)
        if path == "/api/health":
            return _json_response(HTTPStatus.OK, await self._health_view())
        return _error(HTTPStatus.NOT_FOUND, "not_found", f"no API at {path}")

    def _static(self, static: StaticFile, request: Request) -> Response:
        if request.headers.get("If-None-Match") == static.etag:
            return Response(304, "Not Modified", Headers([("ETag", static.etag),
                                                          ("Connection", "close")]), b"")
        headers = Headers([
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", static.content_type),
            ("Content-Length", str(len(static.body))),
            ("ETag", static.etag),
            ("Cache-Control", "no-cache"),
            ("Content-Security-Policy", _CSP),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),  # the URL carries the token
            ("Connection", "close"),
        ])
        return Response(200, "OK", headers, static.body)

    async def _history(self, query: Mapping[str, list[str]]) -> Response:
        device = (query.get("device") or [""])[0]
        if not device or len(device) > 256:
            return _error(HTTPStatus.BAD_REQUEST, "bad_device",
                          "give device=ID (1..256 characters)")
        try:
            limit = int((query.get("limit") or [str(_DEFAULT_HISTORY)])[0])
        except ValueError:
            return _error(HTTPStatus.BAD_REQUEST, "bad_limit", "limit must be an integer")
        if not 1 <= limit <= MAX_HISTORY:
            return _error(HTTPStatus.BAD_REQUEST, "bad_limit",
                          f"limit must lie in 1..{MAX_HISTORY}")
        if not self.history_urls:
            return _json_response(HTTPStatus.OK, {"device": device, "readings": [],
                                                  "available": False})
        params = urllib.parse.urlencode({"device": device, "limit": limit})
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(None, _fetch, f"{base}/v1/history?{params}")
              for base in self.history_urls), return_exceptions=True)
        answers: list[Mapping[str, object]] = []
        errors: list[str] = []
        for base, result in zip(self.history_urls, results, strict=True):
            if isinstance(result, BaseException):
                errors.append(f"{base}: {result}")
                continue
            try:
                answer = orjson.loads(result)
            except orjson.JSONDecodeError:
                errors.append(f"{base}: not JSON")
                continue
            if isinstance(answer, dict):
                answers.append(answer)
        if errors and not answers:
            return _error(HTTPStatus.BAD_GATEWAY, "history_unavailable", "; ".join(errors))
        body = merge_history(device, answers, limit)
        body["available"] = True
        if errors:
            body["errors"] = errors
        return _json_response(HTTPStatus.OK, body)

    async def _health_view(self) -> dict[str, object]:
        async with self._health_lock:
            now = time.monotonic()
            if self._health is not None and now - self._health[0] < _HEALTH_CACHE_S:
                return self._health[1]
            loop = asyncio.get_running_loop()
            names = list(self.health_targets)
            results = await asyncio.gather(
                *(loop.run_in_executor(None, _fetch, self.health_targets[name])
                  for name in names), return_exceptions=True)
            scrapes: dict[str, str | None] = {}
            for name, result in zip(names, results, strict=True):
                scrapes[name] = None if isinstance(result, BaseException) else \
                    result.decode(errors="replace")
            scrapes["relay"] = self.own_metrics()
            previous = self._health[1] if self._health is not None else None
            view = summarize_health(scrapes, previous)
            view["time"] = time.time()
            self._health = (now, view)
            return view
