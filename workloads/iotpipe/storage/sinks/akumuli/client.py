"""Akumuli's two interfaces: RESP-style writes on TCP and the HTTP query API.

Akumuli acknowledges nothing: a send counts as done when the server took the bytes and
answered no error within the confirm window (and did not close the connection), the
strongest promise its protocol gives. After an error line (``-PARSER ...``, ``-DB late
write``) it closes the connection and drops the rest of that send. Reads go to the query API
(one ``select`` per metric, CSV with raw timestamps: rows ``series,ts=<ns>,value``;
``-not found`` means nothing is stored).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson

from iotpipe.storage.sinks import SinkError
from iotpipe.storage.sinks.akumuli.points import Held, Point

__all__ = ["AkumuliClient", "ServerError", "iso_timestamp", "parse_query_answer"]

_CONNECT_TIMEOUT_S = 5.0
_IO_TIMEOUT_S = 10.0
# Attempts at a query that akumulid answers with an empty error (see query()), and the pause
# before the next one (growing).
_EMPTY_ERROR_ATTEMPTS = 4
_EMPTY_ERROR_PAUSE_S = 0.05
_YEAR_NS = 366 * 86400 * 1_000_000_000


def parse_query_answer(text: str) -> list[tuple[str, int, float]]:
    """``(canonical series, timestamp ns, value)`` of a CSV answer with raw timestamps.

    Akumuli prints ``metric tag=v ...,ts=<ns>,<value>`` per line; ``-not found`` (no series
    matched) is an empty answer; any other ``-...`` line is an error (``ValueError``).
    """
    stripped = text.strip()
    if stripped.startswith("-"):
        if stripped[1:].strip().lower() == "not found":
            return []
        raise ValueError(f"server answered {stripped[:200]}")
    rows: list[tuple[str, int, float]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) < 3:
            raise ValueError(f"cannot read row {line[:120]!r}")
        ts_text = parts[1].strip()
        if ts_text.startswith("ts="):
            ts_text = ts_text[3:]
        try:
            metric, *tags = parts[0].split()
            rows.append((" ".join([metric, *sorted(tags)]), int(ts_text),
                         float(parts[2].strip())))
        except ValueError:
            raise ValueError(f"cannot read row {line[:120]!r}") from None
    return rows


def iso_timestamp(ts_ns: int) -> str:
    """Akumuli's basic ISO 8601 form, ``YYYYMMDDTHHMMSS.nnnnnnnnn`` (UTC), for query ranges."""
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%dT%H%M%S") + f".{nanos:09d}"


class ServerError(Exception):
    """The send failed; ``server_message`` is Akumuli's ``-...`` line if it sent one."""

    def __init__(self, message: str, server_message: str | None = None) -> None:
        super().__init__(message)
        self.server_message = server_message


def _read_error_line(sock: socket.socket, first: bytes) -> str:
    """The ``-...`` line that starts with ``first`` (read on, briefly, up to its end)."""
    data = first
    sock.settimeout(1.0)
    with contextlib.suppress(OSError):
        while b"\n" not in data and len(data) < 4096:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    return data.partition(b"\n")[0].rstrip(b"\r")[1:].decode("utf-8", errors="replace")


class AkumuliClient:
    """One TCP write connection (opened on demand) and the query API of one server."""

    def __init__(self, host: str, port: int, query_port: int, confirm_s: float,
                 url: str) -> None:
        self.host = host
        self.port = port
        self.query_port = query_port
        self.confirm_s = confirm_s
        self.url = url
        self._sock: socket.socket | None = None

    def _connection(self) -> socket.socket:
        if self._sock is None:
            try:
                sock = socket.create_connection((self.host, self.port),
                                                timeout=_CONNECT_TIMEOUT_S)
            except OSError as exc:
                raise SinkError(f"sink {self.url}: cannot connect: {exc}") from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock = sock
        return self._sock

    def drop_connection(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def check_idle(self) -> str | None:
        """Why the last send may not be stored (an error line the server sent since, or the
        connection closed or broken), or None when the connection is quietly open."""
        if self._sock is None:
            return None
        sock = self._sock
        try:
            sock.setblocking(False)
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self.drop_connection()
            return f"connection broken: {exc}"
        if data.startswith(b"-"):
            message = _read_error_line(sock, data)
            self.drop_connection()
            return message
        # Closed (a crash or restart may have lost what it had not written) or garbage.
        self.drop_connection()
        return "connection closed by the server" if not data else f"unexpected {data[:40]!r}"

    def send(self, payload: bytes) -> None:
        """Send and listen ``confirm_s`` for an error; ``ServerError`` if the send failed."""
        sock = self._connection()
        try:
            sock.settimeout(_IO_TIMEOUT_S)
            sock.sendall(payload)
            sock.settimeout(self.confirm_s)
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                return  # silence is success in Akumuli's protocol
        except OSError as exc:
            self.drop_connection()
            raise ServerError(f"sink {self.url}: send failed: {exc}") from None
        if answer.startswith(b"-"):
            message = _read_error_line(sock, answer)
            self.drop_connection()
            raise ServerError(f"sink {self.url}: server answered -{message}", message)
        self.drop_connection()
        if not answer:
            raise ServerError(f"sink {self.url}: server closed the connection")
        raise ServerError(f"sink {self.url}: unexpected answer {answer[:80]!r}")

    def query(self, body: dict[str, object]) -> list[tuple[str, int, float]]:
        """``(canonical series, timestamp, value)`` rows of one select query.

        akumulid 0.8.80 now and then answers a valid query with 400 and an empty error (its
        HTTP threads race on the cursor's error state); the same query asked again answers
        properly, so such an answer is asked again a few times before it counts as an error.
        """
        for attempt in range(_EMPTY_ERROR_ATTEMPTS):
            status, text = self._query_once(body)
            if status == 200:
                break
            if text.strip() != "-" or attempt == _EMPTY_ERROR_ATTEMPTS - 1:
                raise SinkError(f"sink {self.url}: query API answered {status}: "
                                f"{text[:200].strip()}")
            time.sleep(_EMPTY_ERROR_PAUSE_S * (attempt + 1))
        try:
            return parse_query_answer(text)
        except ValueError as exc:
            raise SinkError(f"sink {self.url}: query API: {exc}") from None

    def _query_once(self, body: dict[str, object]) -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.host, self.query_port, timeout=_IO_TIMEOUT_S)
        try:
            conn.request("POST", "/api/query", body=orjson.dumps(body),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            text = response.read().decode("utf-8", errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            raise SinkError(f"sink {self.url}: query API on port {self.query_port}: {exc}"
                            ) from None
        finally:
            conn.close()
        return response.status, text

    def held_points(self, points: Sequence[Point], *, newer: bool = False) -> Held:
        """Values the server holds per (series, ts) for ``points``' series between their
        oldest and newest timestamp; with ``newer``, everything from the oldest on (after a
        late-write refusal: the newer points move the marks)."""
        by_metric: dict[str, set[str]] = defaultdict(set)
        since: dict[str, int] = {}
        for point in points:
            metric = point.series.partition(" ")[0]
            by_metric[metric].add(point.series)
            since[metric] = min(since.get(metric, point.ts_ns), point.ts_ns)
        newest = max(p.ts_ns for p in points)
        until = max(newest, time.time_ns()) + _YEAR_NS if newer else newest + 1
        held: Held = defaultdict(list)
        for metric, names in by_metric.items():
            devices = sorted({tag[len("device="):] for name in names
                              for tag in name.split(" ")[1:] if tag.startswith("device=")})
            query: dict[str, object] = {
                "select": metric,
                "range": {"from": iso_timestamp(since[metric]), "to": iso_timestamp(until)},
                "output": {"format": "csv", "timestamp": "raw"},
            }
            if devices:
                query["where"] = {"device": devices}
            for series, ts, value in self.query(query):
                if series in names:
                    held[(series, ts)].append(value)
        return dict(held)
