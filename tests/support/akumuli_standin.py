"""A stand-in for an Akumuli server, faithful to the behaviour in FIELD-NOTES.md.

Akumuli is not built on this machine (see AKUMULI.md), so the sink is tested against this.
It implements what the notes record (checked on a real 0.8.80), and nothing more lenient:

- TCP writes, RESP style, each line ending in CRLF: ``+<metric> <tag>=<value> ...``, then a
  timestamp (``+YYYYMMDDTHHMMSS.nnnnnnnnn`` UTC or ``:<nanoseconds>``), then a value
  (``+<float>`` or ``:<unsigned int>``). A series needs at least one tag. RESP integers are
  unsigned: ``:-36`` is refused with ``-PARSER can't parse integer (character value out of
  range)``.
- Nothing is sent on success. An error is one ``-...`` line, after which the server closes
  the connection; whatever followed in the same send is lost.
- A point older than its series' last point is refused with ``-DB late write``; an equal
  timestamp is accepted (stored again). A malformed timestamp string is silently stored
  as epoch 0.
- HTTP ``POST /api/query`` with a JSON ``select`` query (``range`` from/to as basic ISO 8601,
  ``where`` tag -> value or list of values, ``order-by``, ``limit``, ``output`` format csv
  with ``timestamp`` raw or iso); rows end in ``\n`` and look like
  ``temp class=x device=y,ts=1796035254006683000,21.5`` (raw: the ``ts=`` prefix) or
  ``temp class=x device=y,20261130T120000.000000000,21.5`` (iso). A query that matches no
  series (or names an unknown metric) is answered ``-not found``, a matching series with no
  point in the range an empty body; values print like ``2`` for 2.0 (checked against
  akumulid 0.8.80); a bad query is answered with one ``-...`` line.

``down`` (an Event) makes the server behave as if it were down: every write connection is
closed at once and every query answered 503. ``fail_next`` injects a server-side error (what
a full disk or an internal error looks like from the client) after a number of accepted
points, optionally delayed.

The parser is sans-I/O (``WriteParser``: bytes in, points or an error out) so its own tests
need no sockets.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import socket
import socketserver
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

__all__ = ["AkumuliStandin", "ParseError", "StandinPoint", "WriteParser", "canonical_series",
           "iso_to_ns", "ns_to_iso"]

_ISO = re.compile(rb"^(\d{8})T(\d{6})(?:\.(\d{1,9}))?$")
_FORBIDDEN = re.compile(r"[:=|\s]")
_UNSIGNED = re.compile(rb"^[0-9]+$")
_INT_ERROR = "PARSER can't parse integer (character value out of range)"


class ParseError(Exception):
    """A protocol error: the message becomes the ``-...`` line."""


class StandinPoint(NamedTuple):
    series: str  # canonical: metric, then tags sorted by name
    ts_ns: int
    value: float


def iso_to_ns(text: bytes) -> int | None:
    match = _ISO.match(text)
    if match is None:
        return None
    try:
        moment = datetime.strptime((match.group(1) + match.group(2)).decode(), "%Y%m%d%H%M%S")
    except ValueError:
        return None
    fraction = (match.group(3) or b"").decode().ljust(9, "0")
    return int(moment.replace(tzinfo=UTC).timestamp()) * 1_000_000_000 + int(fraction or "0")


def ns_to_iso(ts_ns: int) -> str:
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%dT%H%M%S") + f".{nanos:09d}"


def canonical_series(text: str) -> str:
    """``metric tag=v ...`` with tags sorted; ``ParseError`` when it is not a series name."""
    parts = text.split()
    if not parts:
        raise ParseError("PARSER error: empty series name")
    metric, tags = parts[0], parts[1:]
    if not tags:
        raise ParseError(f"PARSER error: series {text!r} has no tags (at least one needed)")
    for tag in tags:
        name, sep, value = tag.partition("=")
        if not sep or not name or not value or _FORBIDDEN.search(name + value):
            raise ParseError(f"PARSER error: bad tag {tag!r} in series {text!r}")
    return " ".join([metric, *sorted(tags)])


class WriteParser:
    """Turns the bytes of one TCP connection into points (series, timestamp, value)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._series: str | None = None
        self._ts_ns: int | None = None

    def feed(self, data: bytes) -> list[StandinPoint]:
        """Complete points in ``data`` (and earlier leftovers); ``ParseError`` at a bad line.

        On an error, points parsed before the bad line are in ``ParseError.args[1]``.
        """
        self._buffer += data
        points: list[StandinPoint] = []
        while True:
            line, sep, rest = self._buffer.partition(b"\r\n")
            if not sep:
                return points
            self._buffer = rest
            try:
                point = self._line(line)
            except ParseError as exc:
                raise ParseError(str(exc), points) from None
            if point is not None:
                points.append(point)

    def _line(self, line: bytes) -> StandinPoint | None:
        if not line:
            raise ParseError("PARSER error: empty line")
        kind, body = line[:1], line[1:]
        if self._series is None:
            if kind != b"+":
                raise ParseError(f"PARSER error: expected a series name, got {line[:40]!r}")
            self._series = canonical_series(body.decode("utf-8", errors="replace"))
            return None
        if self._ts_ns is None:
            if kind == b":":
                if not _UNSIGNED.match(body):
                    raise ParseError(_INT_ERROR)
                self._ts_ns = int(body)
            elif kind == b"+":
                # Faithful to Akumuli: a timestamp string it cannot parse becomes epoch 0.
                self._ts_ns = iso_to_ns(body) or 0
            else:
                raise ParseError(f"PARSER error: expected a timestamp, got {line[:40]!r}")
            return None
        if kind == b":" and not _UNSIGNED.match(body):
            raise ParseError(_INT_ERROR)  # RESP integers are unsigned
        try:
            if kind == b"+":
                value = float(body)
            elif kind == b":":
                value = float(int(body))
            else:
                raise ValueError
        except ValueError:
            raise ParseError(f"PARSER error: bad value {line[:40]!r}") from None
        point = StandinPoint(self._series, self._ts_ns, value)
        self._series = self._ts_ns = None
        return point


@dataclass
class _Injected:
    message: str
    after_points: int
    delay_s: float


@dataclass
class _Store:
    lock: threading.Lock = field(default_factory=threading.Lock)
    points: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    injected: _Injected | None = None
    # Queries to answer with 400 and an empty error, as akumulid 0.8.80 now and then does.
    empty_query_errors: int = 0
    errors_sent: list[str] = field(default_factory=list)
    down: threading.Event = field(default_factory=threading.Event)
    connections: int = 0
    bytes_received: int = 0

    def accept(self, point: StandinPoint) -> tuple[str, float] | None:
        """Store ``point``; (error message without '-', delay) if the server refuses it."""
        with self.lock:
            if self.injected is not None:
                if self.injected.after_points <= 0:
                    refusal = (self.injected.message, self.injected.delay_s)
                    self.injected = None
                    return refusal
                self.injected.after_points -= 1
            series = self.points[point.series]
            if series and point.ts_ns < series[-1][0]:
                return "DB late write", 0.0
            series.append((point.ts_ns, point.value))
            return None


class _WriteHandler(socketserver.BaseRequestHandler):
    server: _TcpServer

    def handle(self) -> None:
        store = self.server.store
        if store.down.is_set():
            return  # closed at once, nothing read
        with store.lock:
            store.connections += 1
        parser = WriteParser()
        sock: socket.socket = self.request
        sock.settimeout(30.0)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data or store.down.is_set():
                return  # a server that went down loses what it had not yet taken
            with store.lock:
                store.bytes_received += len(data)
            error: str | None = None
            delay = 0.0
            try:
                points = parser.feed(data)
            except ParseError as exc:
                error, points = exc.args[0], exc.args[1]
            for point in points:
                refused = store.accept(point)
                if refused is not None:
                    error, delay = refused
                    break
            if error is not None:
                if delay:
                    time.sleep(delay)
                with store.lock:
                    store.errors_sent.append(error)
                with contextlib.suppress(OSError):
                    sock.sendall(b"-" + error.encode() + b"\r\n")
                    sock.shutdown(socket.SHUT_RDWR)
                return


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    store: _Store


class _QueryHandler(http.server.BaseHTTPRequestHandler):
    server: _HttpServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet tests

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        if self.path != "/api/query":
            self._answer(404, b"not found\r\n")
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.server.store.down.is_set():
            self._answer(503, b"down\r\n")
            return
        with self.server.store.lock:
            empty_error = self.server.store.empty_query_errors > 0
            self.server.store.empty_query_errors -= empty_error
        if empty_error:
            self._answer(400, b"-")
            return
        try:
            self._answer(200, run_query(self.server.store, body))
        except ParseError as exc:
            self._answer(200, b"-" + str(exc).encode() + b"\r\n")


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    store: _Store


def _query_time(query: dict[str, Any], key: str) -> int:
    value = query["range"].get(key)
    ts = iso_to_ns(value.encode()) if isinstance(value, str) else None
    if ts is None:
        raise ParseError(f"query parsing error: range.{key} is not a basic ISO 8601 timestamp")
    return ts


def _number(value: float) -> str:
    # As akumulid 0.8.80 prints them: 2 for 2.0, 1.5 for 1.5.
    return str(int(value)) if value.is_integer() else repr(value)


def run_query(store: _Store, body: bytes) -> bytes:
    """The CSV (or error) answer to one JSON select query."""
    try:
        query = json.loads(body)
    except ValueError:
        raise ParseError("query parsing error: body is not JSON") from None
    if not isinstance(query, dict) or not isinstance(query.get("select"), str):
        raise ParseError("query parsing error: 'select' (a metric name) is required")
    if not isinstance(query.get("range"), dict):
        raise ParseError("query parsing error: 'range' with 'from' and 'to' is required")
    output = query.get("output") or {}
    if output.get("format", "resp") != "csv":
        raise ParseError("query parsing error: only csv output is implemented by the stand-in")
    raw_ts = output.get("timestamp", "iso") == "raw"
    start, end = _query_time(query, "from"), _query_time(query, "to")
    descending = start > end
    low, high = (end, start) if descending else (start, end)
    where: dict[str, list[str]] = {}
    for tag, wanted in (query.get("where") or {}).items():
        where[tag] = [str(v) for v in wanted] if isinstance(wanted, list) else [str(wanted)]
    metric = query["select"]
    rows: list[tuple[str, int, float]] = []
    matched = 0
    with store.lock:
        for series, points in store.points.items():
            name, *tag_list = series.split(" ")
            tags = dict(tag.partition("=")[::2] for tag in tag_list)
            if name != metric or any(tags.get(t) not in vs for t, vs in where.items()):
                continue
            matched += 1
            # [from, to) ascending; (to, from] descending
            rows += [(series, ts, v) for ts, v in points
                     if (low < ts <= high if descending else low <= ts < high)]
    by_time = query.get("order-by") == "time"
    rows.sort(key=(lambda r: (r[1], r[0])) if by_time else (lambda r: (r[0], r[1])),
              reverse=False)
    if descending:
        rows.reverse()
    limit = query.get("limit")
    if isinstance(limit, int):
        rows = rows[:limit]
    if not matched:
        return b"-not found\r\n"
    lines = [f"{series},{'ts=' + str(ts) if raw_ts else ns_to_iso(ts)},{_number(value)}\n"
             for series, ts, value in rows]
    return "".join(lines).encode()


class AkumuliStandin:
    """TCP write port and HTTP query port on loopback, in daemon threads."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.store = _Store()
        self._tcp = _TcpServer((host, 0), _WriteHandler)
        self._tcp.store = self.store
        self._http = _HttpServer((host, 0), _QueryHandler)
        self._http.store = self.store
        self.host = host
        self.port = int(self._tcp.server_address[1])
        self.query_port = int(self._http.server_address[1])
        self._threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05},
                                          daemon=True) for s in (self._tcp, self._http)]

    def start(self) -> AkumuliStandin:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in (self._tcp, self._http):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> AkumuliStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, message: str, after_points: int = 0, delay_s: float = 0.0) -> None:
        """Refuse the point after ``after_points`` more accepted ones with ``-message``."""
        with self.store.lock:
            self.store.injected = _Injected(message, after_points, delay_s)

    def fail_queries_empty(self, count: int) -> None:
        """Answer the next ``count`` queries with 400 and an empty error ("-")."""
        with self.store.lock:
            self.store.empty_query_errors = count

    @property
    def down(self) -> threading.Event:
        return self.store.down

    def series(self) -> dict[str, list[tuple[int, float]]]:
        with self.store.lock:
            return {name: list(points) for name, points in self.store.points.items()}

    @property
    def errors_sent(self) -> list[str]:
        with self.store.lock:
            return list(self.store.errors_sent)

    @property
    def connections(self) -> int:
        with self.store.lock:
            return self.store.connections
