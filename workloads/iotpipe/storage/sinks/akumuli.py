"""Akumuli sink: RESP-style writes on TCP (default port 8282), one point per numeric field.

URL: ``akumuli://host[:8282]``. Options, all optional (the operator's CRD passes none):
``?query_port=8181`` (the HTTP API, used to read back what the server holds),
``?marks=/path/file.db`` (the high-water-mark file, see below) and ``?confirm_ms=50`` (how
long to listen for an error after each send).

Points. Each numeric value of a reading's data object becomes one point: metric = the field
name (nested objects flattened with ``_``, sanitised to ``[A-Za-z0-9_./-]``), tags
``device=<id> class=<class> location=<location>`` plus the registry labels (a label named like
one of those three is dropped; tag values have Akumuli's forbidden characters - space, ``:``,
``=``, ``|`` - and ``,`` replaced by ``_``; empty values are left out), timestamp = the
reading's ``ts_ns``, always sent as ``:<nanoseconds>`` (Akumuli stores a timestamp string it
cannot parse as epoch 0, silently).

Values. Akumuli's RESP integers are unsigned (``:-36`` is refused with ``-PARSER can't parse
integer``) and every value is stored as a float64. So booleans are ``:0``/``:1``, integers
in ``[0, 2**64)`` ``:<int>``, and negative integers (and larger ones) ``+<float>``: exact for
``|v| <= 2**53``, rounded to the nearest float64 beyond that (as Akumuli would store them
anyway). Floats are ``+<repr>``. Strings, nulls, lists and non-finite floats are skipped and
counted (``iotpipe_storage_akumuli_skipped_values_total``).

Order and late points. Akumuli refuses a point older than its series' newest point
(``-DB late write``) and stores an equal timestamp again. The sink sorts each write per
series by timestamp and keeps a per-series high-water mark (the newest timestamp it knows
the server holds), in a small SQLite file (WAL, ``synchronous=FULL``), by default
``<storage data dir>/akumuli-<host>-<port>.marks.db``. A point older than its mark is never
sent (it would close the connection): it is returned as a late point, which the storage tier
keeps in the store of record's ``late_points`` table (``iotpipe query --late``) and counts in
``iotpipe_storage_late_points_total`` - apart from redeliveries. A point with the mark's own
timestamp is sent (Akumuli stores it; it is another reading).

Exactly once. The sink tails the store of record (``iotpipe.storage.tail``), which hands it
every row once; only a range whose write may have been cut short comes again, with
``recovering=True``. Akumuli acknowledges nothing, and after an error line (``-PARSER ...``,
``-DB late write``) it closes the connection and drops the rest of that send; the points
before the failing one are stored. So whenever the sink cannot be sure what a send stored
(a recovering write, an error line, a close, a socket error), it reads back from the query
API (one ``select`` per metric, CSV with raw timestamps: rows ``series,ts=<ns>,value``;
``-not found`` means nothing is stored) the points of the write's series between its oldest
and newest timestamp (after a ``-DB late write``: from the oldest on, without end), moves
the marks up to the newest point the server holds, and sends only points the server does
not hold (matched by series, timestamp and value). After an error line it
does that at once, up to 3 rounds per write, then fails the write (the storage tier retries
the range with backoff). If the query API cannot be reached the write fails: the sink never
sends blind.

"Durable" for Akumuli. The sink counts a send as done when the server took the bytes and
answered no error within ``confirm_ms`` (and did not close the connection); that is the
strongest promise its protocol gives. An error that arrives after the window, or a connection
the server closed since (a crash or restart may have lost bytes it had taken), is found
before the next write: that write then reads back the previous send's series and resends
its missing points too (if the storage process dies first, or no further write comes, they
stay missing in Akumuli; the store of record holds them).

Known limits. The read-back assumes this sink is the only writer of its series. A point
counts as held when the server has its series, nanosecond timestamp and value (within a
relative 1e-9): two readings of one series with the same timestamp and value, one in an
interrupted range and one in an earlier range, are taken for one by the read-back. Several
storage replicas writing the same series (one consumer group spreads a device over
replicas) each keep their own marks; a point one of them finds older than the server's
newest is kept as late.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import math
import os
import re
import socket
import sqlite3
import time
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import orjson
import prometheus_client

from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import LatePoint, SinkBatch, SinkError, WriteResult

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_QUERY_PORT",
    "AkumuliSink",
    "MarksStore",
    "Plan",
    "Point",
    "format_points",
    "iso_timestamp",
    "parse_query_answer",
    "plan_write",
    "point_number",
    "points_for",
    "resp_value",
    "series_name",
]

log = logging.getLogger("iotpipe.storage.akumuli")

DEFAULT_PORT = 8282
DEFAULT_QUERY_PORT = 8181
DEFAULT_CONFIRM_S = 0.05
_CONNECT_TIMEOUT_S = 5.0
_IO_TIMEOUT_S = 10.0
_LATE_LOG_INTERVAL_S = 60.0
_ERROR_ROUNDS = 3
_UINT64_END = 1 << 64
_YEAR_NS = 366 * 86400 * 1_000_000_000

SKIPPED_VALUES = prometheus_client.Counter(
    "iotpipe_storage_akumuli_skipped_values_total",
    "Data values that are not numbers or booleans (strings, nulls, lists), not sent",
    ["sink"])
RECONCILES = prometheus_client.Counter(
    "iotpipe_storage_akumuli_reconciles_total",
    "Times the sink read back what the server holds (recovery or after an error)", ["sink"])

_BAD_NAME = re.compile(r"[^A-Za-z0-9_./-]")
# Akumuli forbids space, ':', '=' and '|' in names and values; ',' would break CSV answers.
_BAD_VALUE = re.compile(r"[\s:=|,]")


class Point(NamedTuple):
    series: str  # canonical series name: metric, then tags sorted by name
    ts_ns: int
    value: str  # the RESP value line without CRLF: ``+21.5`` or ``:1``
    field: str = ""  # the data field it came from
    reading: StoredReading | None = None


def sanitise_name(text: str) -> str:
    return _BAD_NAME.sub("_", text) or "_"


def series_name(metric: str, tags: Mapping[str, str]) -> str:
    """The canonical series name (tags sorted by name), as the marks and queries key it."""
    return " ".join([metric, *(f"{k}={v}" for k, v in sorted(tags.items()))])


def reading_tags(reading: StoredReading) -> dict[str, str]:
    tags: dict[str, str] = {}
    pairs = [("device", reading.device_id), ("class", reading.device_class),
             ("location", reading.location)]
    pairs += [(sanitise_name(str(k)), v) for k, v in sorted(reading.labels.items())]
    for name, value in pairs:
        clean = _BAD_VALUE.sub("_", str(value))
        # first wins: labels cannot override device/class/location, nor collide after sanitising
        if clean and name not in tags:
            tags[name] = clean
    return tags


def resp_value(value: object) -> str | None:
    """The RESP value line (without CRLF) Akumuli accepts for ``value``; None: not numeric."""
    if isinstance(value, bool):
        return ":1" if value else ":0"
    if isinstance(value, int):
        if 0 <= value < _UINT64_END:
            return f":{value}"  # RESP integers are unsigned
        try:
            return f"+{float(value)!r}"  # negative: a float, exact up to 2**53
        except OverflowError:
            return None
    if isinstance(value, float):
        return f"+{value!r}" if math.isfinite(value) else None
    return None


def _values(data: object, prefix: str = "") -> Iterator[tuple[str, str | None]]:
    """``(field name, RESP value or None when not numeric)`` for every leaf of ``data``."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _values(value, f"{name}_")
        else:
            yield name, resp_value(value)


def points_for(reading: StoredReading) -> tuple[list[Point], int]:
    """The points of one reading, and how many values were skipped as not numeric."""
    try:
        data = orjson.loads(reading.data)
    except orjson.JSONDecodeError:
        return [], 1
    points: list[Point] = []
    skipped = 0
    tags = reading_tags(reading)
    for field_name, value in _values(data):
        if value is None:
            skipped += 1
            continue
        points.append(Point(series_name(sanitise_name(field_name), tags), reading.ts_ns, value,
                            field_name, reading))
    return points, skipped


def format_points(points: Sequence[Point]) -> bytes:
    return "".join(f"+{p.series}\r\n:{p.ts_ns}\r\n{p.value}\r\n" for p in points).encode()


class Plan(NamedTuple):
    send: list[Point]  # sorted by series, then timestamp (stable)
    late: list[Point]  # older than their series' mark: never sent
    held: int  # points the server already holds (read back), not sent again
    new_marks: dict[str, int]  # series -> newest timestamp sent


Held = dict[tuple[str, int], list[float]]  # (series, ts) -> values the server holds there

# Two values count as one point in a read-back when this close (Akumuli prints doubles in
# CSV; a rounded print must still match, two readings this close at one series and
# nanosecond are taken for one - only ever in a recovery).
_VALUE_REL_TOL = 1e-9


def _take_held(values: list[float] | None, value: float) -> bool:
    """Remove ``value`` from ``values`` if the server holds it there; True if it did."""
    if not values:
        return False
    for i, held in enumerate(values):
        if math.isclose(held, value, rel_tol=_VALUE_REL_TOL, abs_tol=1e-300):
            del values[i]
            return True
    return False


def point_number(point: Point) -> float:
    return float(point.value[1:])


def plan_write(points: Sequence[Point], marks: Mapping[str, int],
               held: Held | None = None) -> Plan:
    """What to send: each series in timestamp order; nothing older than its mark (late);
    nothing the server already holds (``held``: values per (series, ts), read back)."""
    remaining = {key: list(values) for key, values in (held or {}).items()}
    send: list[Point] = []
    late: list[Point] = []
    already = 0
    new_marks: dict[str, int] = {}
    for point in sorted(points, key=lambda p: (p.series, p.ts_ns)):
        if _take_held(remaining.get((point.series, point.ts_ns)), point_number(point)):
            already += 1
            continue
        mark = new_marks.get(point.series, marks.get(point.series))
        if mark is not None and point.ts_ns < mark:
            late.append(point)
            continue
        new_marks[point.series] = point.ts_ns
        send.append(point)
    return Plan(send, late, already, new_marks)


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


class MarksStore:
    """Per-series high-water marks in a small SQLite file, durable at every commit."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("CREATE TABLE IF NOT EXISTS marks "
                             "(series TEXT PRIMARY KEY, ts_ns INTEGER NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise SinkError(f"sink {url}: cannot open marks file {str(path)!r}: {exc} "
                            f"(set ?marks=/writable/path.db or the storage data dir)") from None
        self.url = url

    def load(self) -> dict[str, int]:
        rows = self._db.execute("SELECT series, ts_ns FROM marks")
        return {series: int(ts) for series, ts in rows}

    def save(self, marks: Mapping[str, int], forget: Sequence[str] = ()) -> None:
        """Set ``marks`` and delete the marks of ``forget``, in one commit."""
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO marks (series, ts_ns) VALUES (?, ?) ON CONFLICT (series) "
                    "DO UPDATE SET ts_ns = excluded.ts_ns", list(marks.items()))
                db.executemany("DELETE FROM marks WHERE series = ?", [(s,) for s in forget])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SinkError(f"sink {self.url}: cannot save marks: {exc}") from None

    def close(self) -> None:
        self._db.close()


class _ServerError(Exception):
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


def _default_state_dir() -> str:
    # Used only when the sink is opened without the storage tier's --data-dir (tests, tools).
    return os.environ.get("IOTPIPE_STORAGE_DATA_DIR") or "/var/lib/iotpipe/store"


class AkumuliSink:
    kind = "akumuli"

    def __init__(self, host: str, port: int = DEFAULT_PORT, *,
                 query_port: int = DEFAULT_QUERY_PORT, marks_path: str | Path | None = None,
                 confirm_s: float = DEFAULT_CONFIRM_S, url: str | None = None,
                 state_dir: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.query_port = query_port
        self.confirm_s = confirm_s
        self.url = url or f"akumuli://{host}:{port}"
        if marks_path is None:
            marks_path = (Path(state_dir or _default_state_dir())
                          / f"akumuli-{sanitise_name(host)}-{port}.marks.db")
        self._store = MarksStore(Path(marks_path), self.url)
        self._marks = self._store.load()
        self._sock: socket.socket | None = None
        # The points of the last send and its series' marks before it: checked again if
        # its error arrives after the confirm window.
        self._last_points: list[Point] = []
        self._last_marks_before: dict[str, int | None] = {}
        self._resend: list[Point] = []  # points of an earlier send the server may have lost
        self._late_unlogged = 0
        self._late_logged_at = 0.0

    @classmethod
    def from_url(cls, url: str, state_dir: Path | None = None) -> AkumuliSink:
        parsed = urllib.parse.urlsplit(url)
        try:
            port = parsed.port or DEFAULT_PORT
        except ValueError:
            raise SinkError(f"sink URL {url!r}: bad port") from None
        if not parsed.hostname:
            raise SinkError(f"sink URL {url!r}: no host (expected akumuli://host:8282)")
        if parsed.path not in ("", "/"):
            raise SinkError(f"sink URL {url!r}: unexpected path {parsed.path!r} "
                            f"(expected akumuli://host:8282)")
        options = urllib.parse.parse_qs(parsed.query, keep_blank_values=True)
        unknown = set(options) - {"query_port", "marks", "confirm_ms"}
        if unknown:
            raise SinkError(f"sink URL {url!r}: unknown option(s) {sorted(unknown)} "
                            f"(known: confirm_ms, marks, query_port)")
        try:
            query_port = int(options.get("query_port", [DEFAULT_QUERY_PORT])[-1])
            confirm_ms = float(options.get("confirm_ms", [DEFAULT_CONFIRM_S * 1000])[-1])
        except ValueError:
            raise SinkError(f"sink URL {url!r}: query_port and confirm_ms must be numbers"
                            ) from None
        if not 0 < query_port < 65536:
            raise SinkError(f"sink URL {url!r}: query_port {query_port} is out of range")
        if not 0 < confirm_ms <= 10_000:
            raise SinkError(f"sink URL {url!r}: confirm_ms must be in (0, 10000]")
        marks = options.get("marks", [None])[-1]
        if marks == "":
            raise SinkError(f"sink URL {url!r}: empty marks path")
        return cls(parsed.hostname, port, query_port=query_port, marks_path=marks,
                   confirm_s=confirm_ms / 1000, url=url, state_dir=state_dir)

    # --- connection -----------------------------------------------------------------------

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

    def _drop_connection(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _check_idle(self) -> str | None:
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
            self._drop_connection()
            return f"connection broken: {exc}"
        if data.startswith(b"-"):
            message = _read_error_line(sock, data)
            self._drop_connection()
            return message
        # Closed (a crash or restart may have lost what it had not written) or garbage.
        self._drop_connection()
        return "connection closed by the server" if not data else f"unexpected {data[:40]!r}"

    def _send(self, payload: bytes) -> None:
        """Send and listen ``confirm_s`` for an error; ``_ServerError`` if the send failed."""
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
            self._drop_connection()
            raise _ServerError(f"sink {self.url}: send failed: {exc}") from None
        if answer.startswith(b"-"):
            message = _read_error_line(sock, answer)
            self._drop_connection()
            raise _ServerError(f"sink {self.url}: server answered -{message}", message)
        self._drop_connection()
        if not answer:
            raise _ServerError(f"sink {self.url}: server closed the connection")
        raise _ServerError(f"sink {self.url}: unexpected answer {answer[:80]!r}")

    # --- reading back what the server holds -----------------------------------------------

    def _query(self, body: dict[str, object]) -> list[tuple[str, int, float]]:
        """``(canonical series, timestamp, value)`` rows of one select query."""
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
        if response.status != 200:
            raise SinkError(f"sink {self.url}: query API answered {response.status}: "
                            f"{text[:200].strip()}")
        try:
            return parse_query_answer(text)
        except ValueError as exc:
            raise SinkError(f"sink {self.url}: query API: {exc}") from None

    def held_points(self, points: Sequence[Point], *, newer: bool = False) -> Held:
        """Values the server holds per (series, ts) for ``points``' series between their
        oldest and newest timestamp; with ``newer``, everything from the oldest on (after a
        late-write refusal: the newer points move the marks)."""
        RECONCILES.labels(self.kind).inc()
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
            for series, ts, value in self._query(query):
                if series in names:
                    held[(series, ts)].append(value)
        return dict(held)

    def _raise_marks(self, held: Held) -> None:
        newest: dict[str, int] = {}
        for series, ts in held:
            if ts > newest.get(series, -(1 << 63)):
                newest[series] = ts
        raised = {s: ts for s, ts in newest.items() if ts > self._marks.get(s, -(1 << 63))}
        if raised:
            self._store.save(raised)
            self._marks.update(raised)

    # --- the write ------------------------------------------------------------------------

    def _count_late(self, late: int) -> None:
        if not late:
            return
        self._late_unlogged += late
        now = time.monotonic()
        if now - self._late_logged_at >= _LATE_LOG_INTERVAL_S:
            log.warning("points older than their series' newest point in Akumuli were not "
                        "sent; they are kept in the store of record's late_points",
                        extra={"fields": {"sink": self.url, "points": self._late_unlogged}})
            self._late_unlogged = 0
            self._late_logged_at = now

    def _suspect_last_send(self, why: str) -> None:
        """The last send was taken as done but may not be stored (an error or a close came
        after its confirm window): keep its points to be read back and resent with the
        next sends until one succeeds, and put its marks back to before it (the read-back
        raises them to what the server really holds)."""
        if not self._last_points:
            return
        log.warning("Akumuli may have lost the last confirmed send; reading back its series "
                    "and resending what is missing",
                    extra={"fields": {"sink": self.url, "error": why}})
        self._resend = self._last_points + self._resend
        self._last_points = []
        restored = {s: m for s, m in self._last_marks_before.items() if m is not None}
        forget = [s for s, m in self._last_marks_before.items() if m is None]
        self._store.save(restored, forget)
        self._marks.update(restored)
        for series in forget:
            self._marks.pop(series, None)

    def write(self, batches: Sequence[SinkBatch], *, recovering: bool = False) -> WriteResult:
        points: list[Point] = []
        skipped_values = 0
        for batch in batches:
            for reading in batch.readings:
                reading_points, skipped = points_for(reading)
                points += reading_points
                skipped_values += skipped
        if skipped_values:
            SKIPPED_VALUES.labels(self.kind).inc(skipped_values)

        stale_error = self._check_idle()
        if stale_error is not None:
            self._suspect_last_send(stale_error)

        already = 0
        late: list[Point] = []
        late_write = False  # the server holds newer points than the marks say
        for round_number in range(1, _ERROR_ROUNDS + 1):
            if self._resend:
                recovering = True
            all_points = self._resend + points
            if not all_points:
                return WriteResult(0, 0)
            held: Held = {}
            if recovering:
                # Raises if the query API is down: the write fails and is retried later.
                held = self.held_points(all_points, newer=late_write)
                self._raise_marks(held)
            plan = plan_write(all_points, self._marks, held)
            already, late = plan.held, plan.late
            if not plan.send:
                self._last_points = []
                self._resend = []
                break
            try:
                self._send(format_points(plan.send))
            except _ServerError as exc:
                # Some prefix of the send was stored and the rest lost: read back, resend.
                # The previous send on this connection is suspect too: the server may have
                # gone down after it took those bytes.
                self._suspect_last_send(str(exc))
                recovering = True
                late_write = late_write or "late write" in (exc.server_message or "")
                if exc.server_message is not None and round_number < _ERROR_ROUNDS:
                    log.warning("Akumuli refused a send; reading back what it stored",
                                extra={"fields": {"sink": self.url,
                                                  "error": exc.server_message}})
                    continue
                raise SinkError(str(exc)) from None
            self._last_marks_before = {s: self._marks.get(s) for s in plan.new_marks}
            self._store.save(plan.new_marks)
            self._marks.update(plan.new_marks)
            self._last_points = plan.send
            self._resend = []
            break
        else:  # pragma: no cover - the loop always breaks or raises
            raise AssertionError("unreachable")
        self._count_late(len(late))
        reason = "older than its series' newest point in Akumuli (late write refused)"
        # The value as a number (the RESP type marker dropped), as a user would query it.
        late_points = [LatePoint(p.reading, p.field, p.value[1:], reason)
                       for p in late if p.reading is not None]
        return WriteResult(len(plan.send), already, tuple(late_points))

    def close(self) -> None:
        self._drop_connection()
        self._store.close()
