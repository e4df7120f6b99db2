"""Storage's small read API: the recent readings of one device, from the store of record.

``GET /v1/history?device=ID[&limit=N][&window=SECONDS]`` on the storage tier's metrics
port (only with ``--read-api``) answers::

    {"device": "sim-3", "readings": [{"id": "m-1", "ts_ns": 1796..., "data": {...}}, ...]}

the newest ``limit`` (default 600, at most 5000) readings of the device whose own timestamp
lies in the last ``window`` seconds (default 3600, at most 7 days), oldest first. The live
page's device chart starts from this (through the relay's ``/api/history``).

Why storage and not the relay: storage holds the store of record (the embedded SQLite
sink), the relay keeps nothing. The API is read-only, opens the store read-only per request
(SQLite in WAL mode lets it read while the tier writes), and lives on the internal metrics
port, which is why it is off unless asked for: the page reaches it only through the relay,
which checks the client's token.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from iotpipe.storage.sinks import ReadableSink, SinkError, open_sink

__all__ = ["HISTORY_PATH", "HistoryApp", "HistoryQuery", "history", "parse_history_query"]

HISTORY_PATH = "/v1/history"
DEFAULT_LIMIT = 600
MAX_LIMIT = 5000
DEFAULT_WINDOW_S = 3600.0
MAX_WINDOW_S = 7 * 86400.0


@dataclass(frozen=True)
class HistoryQuery:
    device: str
    limit: int = DEFAULT_LIMIT
    window_s: float = DEFAULT_WINDOW_S


def parse_history_query(query: Mapping[str, list[str]]) -> HistoryQuery:
    """The parameters of one request; ValueError names the bad one."""
    device = (query.get("device") or [""])[0]
    if not device or len(device) > 256:
        raise ValueError("device: give device=ID (1..256 characters)")
    try:
        limit = int((query.get("limit") or [str(DEFAULT_LIMIT)])[0])
    except ValueError:
        raise ValueError("limit: must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit: must lie in 1..{MAX_LIMIT}")
    try:
        window_s = float((query.get("window") or [str(DEFAULT_WINDOW_S)])[0])
    except ValueError:
        raise ValueError("window: must be a number of seconds") from None
    if not 0 < window_s <= MAX_WINDOW_S:
        raise ValueError(f"window: must lie in (0, {MAX_WINDOW_S:g}] seconds")
    return HistoryQuery(device, limit, window_s)


def history(sink: ReadableSink, request: HistoryQuery, now_ns: int) -> dict[str, object]:
    """The newest ``request.limit`` readings of the device within the window, oldest first."""
    since_ns = now_ns - int(request.window_s * 1e9)
    # Sinks read oldest first; the tail of the window is what a chart wants. The window
    # bounds what is read (a device at 1 msg/s has 3600 readings in the default hour).
    newest: list[dict[str, object]] = []
    for reading in sink.query(request.device, since_ns, None, None):
        try:
            data: object = orjson.loads(reading.data)
        except orjson.JSONDecodeError:
            data = reading.data
        newest.append({"id": reading.msg_id, "ts_ns": reading.ts_ns, "data": data})
        if len(newest) > 2 * request.limit:
            del newest[:-request.limit]
    return {"device": request.device, "readings": newest[-request.limit:]}


class HistoryApp:
    """The WSGI endpoint; mounted by the storage tier on its metrics port."""

    def __init__(self, sink_url: str, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.sink_url = sink_url
        self.clock_ns = clock_ns

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        def answer(status: str, body: object) -> list[bytes]:
            data = orjson.dumps(body)
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(data))),
                                    ("Cache-Control", "no-store")])
            return [data]

        if environ.get("REQUEST_METHOD", "GET") != "GET":
            return answer("405 Method Not Allowed", {"error": "method", "detail": "GET only"})
        try:
            request = parse_history_query(urllib.parse.parse_qs(environ.get("QUERY_STRING", "")))
        except ValueError as exc:
            return answer("400 Bad Request", {"error": "bad_request", "detail": str(exc)})
        try:
            sink = open_sink(self.sink_url, read_only=True)
        except SinkError as exc:
            if "not found" in str(exc):  # nothing stored yet
                return answer("200 OK", {"device": request.device, "readings": []})
            return answer("503 Service Unavailable", {"error": "store", "detail": str(exc)})
        try:
            if not isinstance(sink, ReadableSink):
                return answer("501 Not Implemented", {
                    "error": "not_readable", "detail": f"{self.sink_url} cannot be read back"})
            return answer("200 OK", history(sink, request, self.clock_ns()))
        except SinkError as exc:
            return answer("503 Service Unavailable", {"error": "store", "detail": str(exc)})
        finally:
            sink.close()
