"""Akumuli sink: RESP-style writes on TCP (default port 8282), one point per numeric field.

URL: ``akumuli://host[:8282]``. Options, all optional (the operator's CRD passes none):
``?query_port=8181`` (the HTTP API, used only to re-read what the server holds after an
error), ``?marks=/path/file.db`` (the high-water-mark file, see below) and
``?confirm_ms=50`` (how long to listen for an error after each send).

Points. Each numeric value of a reading's data object becomes one point: metric = the field
name (nested objects flattened with ``_``, sanitised to ``[A-Za-z0-9_./-]``), tags
``device=<id> class=<class> location=<location>`` plus the registry labels (a label named like
one of those three is dropped; tag values have Akumuli's forbidden characters - space, ``:``,
``=``, ``|`` - and ``,`` replaced by ``_``; empty values are left out), timestamp = the
reading's ``ts_ns``. Booleans are ``:0``/``:1``, integers ``:<int>``, floats ``+<float>``.
Strings, nulls, lists and non-finite floats are skipped and counted
(``iotpipe_storage_akumuli_skipped_values_total``). Timestamps are always sent as
``:<nanoseconds>``: Akumuli stores a timestamp string it cannot parse as epoch 0, silently.

Ordering and high-water marks. Akumuli refuses a point older than its series' last point
(``-DB late write``) and stores an equal timestamp again. So every write is sorted per
series by timestamp, and the sink keeps a per-series high-water mark (the last timestamp it
wrote). Points at or below the mark - redelivered by the feed, or late - are not sent: a
redelivered batch stores nothing twice. Two points of one series with the same timestamp in
one write keep the first. Skipped points are counted
(``iotpipe_storage_akumuli_late_points_total``, and as ``duplicates`` in the write result:
the sink cannot tell a late point from a redelivered one) and logged at most once a minute.
The marks live in a small SQLite file (WAL, ``synchronous=FULL``), by default
``<storage data dir>/akumuli-<host>-<port>.marks.db`` (the data dir comes from
``IOTPIPE_STORAGE_DATA_DIR``, which the operator sets; else ``/var/lib/iotpipe/store``), and
are updated in the same ``write`` after the send succeeded, so a restarted storage tier does
not resend what it wrote. Before each send the sink also commits a "pending" record (the
series about to be sent, their first timestamp and their mark before); the marks commit
clears it. A storage tier killed between the two finds it at start, and its first write
re-reads those series from the server (see Errors) before sending anything, so the
redelivery that follows stores nothing twice. Cost: two small SQLite commits per write.

"Durable" for Akumuli. Akumuli acknowledges nothing: the sink counts a write as done when
the server took the bytes and answered no error within ``confirm_ms`` (and did not close the
connection). That is the strongest promise its protocol gives; SQLite remains the store of
record, and this sink feeds dashboards.

Errors. After each send the sink listens ``confirm_ms`` for a ``-...`` line or a close.

- Any error line, a close or a socket timeout: the connection is dropped, and since points
  before the failing line were stored and the rest lost, the sink asks the server (HTTP
  ``/api/query``, one select per metric) which points of this write it holds, and moves the
  marks to that. The write then raises ``SinkError``: the storage tier retries with backoff
  (0.1 s doubling to 5 s; that is also the reconnect backoff: one connection attempt per
  write) and does not acknowledge the feed; the retry sends only what is missing.
- ``-DB late write`` means the server holds newer points for some series than the marks say
  (marks file lost, another writer, or a crash between a send and its marks commit). It
  must not wedge the feed: the sink re-reads the marks from the server as above and
  retries the write at once (up to 3 rounds); the points now at or below a mark are
  skipped and counted as late, the rest are written, and ``write`` returns normally. If
  the query API cannot be reached the write raises and is retried like any error.
- An error that arrives after the confirm window is seen before the next send (the idle
  connection has a ``-...`` line waiting). The previous write had returned, so the feed
  acknowledged it; the sink keeps that write's points in memory, re-reads its series from
  the server as above, and sends what the server lacks together with the next write. (If
  the storage process dies before that next write, those points are missing in Akumuli;
  SQLite still has them.)
- If re-reading fails (query API unreachable), the series stay "unsettled" (in memory and
  in the pending record): every later write first retries the re-read and sends nothing
  until it succeeds, because sending on stale marks could store points twice.
- Like the VictoriaMetrics sink, nothing is checked at startup: an unreachable host makes
  writes fail (the tier is not ready and logs the URL) until it answers.

Known limits. The re-read assumes this sink is the only writer of its series and that the
query API (``query_port``, default 8181) is reachable from the storage tier. Write counts
after an error are approximate (points the server took before the error are counted as
skipped by the retry). Marks are per storage process: several storage replicas writing the
same series (one consumer group spreads a device over replicas) can refuse each other's
older points as late; those points are skipped and counted, never retried forever.
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
from prometheus_client import Counter

from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import SinkBatch, SinkError, WriteResult

__all__ = [
    "DEFAULT_PORT",
    "DEFAULT_QUERY_PORT",
    "AkumuliSink",
    "MarksStore",
    "Plan",
    "Point",
    "format_points",
    "iso_timestamp",
    "plan_write",
    "points_for",
    "series_name",
]

log = logging.getLogger("iotpipe.storage.akumuli")

DEFAULT_PORT = 8282
DEFAULT_QUERY_PORT = 8181
DEFAULT_CONFIRM_S = 0.05
_CONNECT_TIMEOUT_S = 5.0
_IO_TIMEOUT_S = 10.0
_LATE_LOG_INTERVAL_S = 60.0
_LATE_WRITE_ROUNDS = 3
_MAX_TS_NS = (1 << 63) - 1
_INT64 = range(-(1 << 63), 1 << 63)

LATE_POINTS = Counter(
    "iotpipe_storage_akumuli_late_points_total",
    "Points at or below their series' high-water mark (late or redelivered), not sent",
    ["sink"])
SKIPPED_VALUES = Counter(
    "iotpipe_storage_akumuli_skipped_values_total",
    "Data values that are not numbers or booleans (strings, nulls, lists), not sent",
    ["sink"])
RECONCILES = Counter(
    "iotpipe_storage_akumuli_reconciles_total",
    "Times the marks were re-read from the server after an error", ["sink"])

_BAD_NAME = re.compile(r"[^A-Za-z0-9_./-]")
# Akumuli forbids space, ':', '=' and '|' in names and values; ',' would break CSV answers.
_BAD_VALUE = re.compile(r"[\s:=|,]")


class Point(NamedTuple):
    series: str  # canonical series name: metric, then tags sorted by name
    ts_ns: int
    value: str  # the RESP value line without CRLF: ``+21.5`` or ``:1``


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


def _values(data: object, prefix: str = "") -> Iterator[tuple[str, str | None]]:
    """``(field name, RESP value or None when not numeric)`` for every leaf of ``data``."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            yield name, ":1" if value else ":0"
        elif isinstance(value, int):
            yield name, f":{value}" if value in _INT64 else f"+{float(value)!r}"
        elif isinstance(value, float):
            yield name, f"+{value!r}" if math.isfinite(value) else None
        elif isinstance(value, dict):
            yield from _values(value, f"{name}_")
        else:
            yield name, None


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
        points.append(Point(series_name(sanitise_name(field_name), tags), reading.ts_ns, value))
    return points, skipped


def format_points(points: Sequence[Point]) -> bytes:
    return "".join(f"+{p.series}\r\n:{p.ts_ns}\r\n{p.value}\r\n" for p in points).encode()


class Plan(NamedTuple):
    send: list[Point]  # sorted by series, then timestamp
    late: int  # points at or below their series' mark (or repeating a timestamp), not sent
    new_marks: dict[str, int]  # series -> newest timestamp sent
    first_ts: dict[str, int]  # series -> oldest timestamp sent


def plan_write(points: Sequence[Point], marks: Mapping[str, int]) -> Plan:
    """What to send: each series in timestamp order, nothing at or below its mark."""
    send: list[Point] = []
    late = 0
    new_marks: dict[str, int] = {}
    first_ts: dict[str, int] = {}
    for point in sorted(points, key=lambda p: (p.series, p.ts_ns)):
        last = new_marks.get(point.series)
        if last is None:
            mark = marks.get(point.series)
            if mark is not None and point.ts_ns <= mark:
                late += 1
                continue
            first_ts[point.series] = point.ts_ns
        elif point.ts_ns <= last:  # a second point with the same timestamp: keep the first
            late += 1
            continue
        new_marks[point.series] = point.ts_ns
        send.append(point)
    return Plan(send, late, new_marks, first_ts)


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
            # The series of a send in progress: present after a crash mid-send.
            self._db.execute("CREATE TABLE IF NOT EXISTS pending (series TEXT PRIMARY KEY, "
                             "first_ts INTEGER NOT NULL, mark_before INTEGER)")
        except (OSError, sqlite3.Error) as exc:
            raise SinkError(f"sink {url}: cannot open marks file {str(path)!r}: {exc} "
                            f"(set ?marks=/writable/path.db or the storage data dir)") from None
        self.url = url

    def load(self) -> dict[str, int]:
        rows = self._db.execute("SELECT series, ts_ns FROM marks")
        return {series: int(ts) for series, ts in rows}

    def load_pending(self) -> dict[str, tuple[int, int | None]]:
        rows = self._db.execute("SELECT series, first_ts, mark_before FROM pending")
        return {series: (int(first), None if before is None else int(before))
                for series, first, before in rows}

    def _transaction(self, statements: Sequence[tuple[str, Sequence[Sequence[object]]]]
                     ) -> None:
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    db.executemany(sql, rows)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SinkError(f"sink {self.url}: cannot save marks: {exc}") from None

    def begin_send(self, sent: Mapping[str, tuple[int, int | None]]) -> None:
        """Record the series about to be sent (first timestamp, mark before), durably."""
        self._transaction([
            ("DELETE FROM pending", [()]),
            ("INSERT INTO pending (series, first_ts, mark_before) VALUES (?, ?, ?)",
             [(series, first, before) for series, (first, before) in sent.items()]),
        ])

    def save(self, marks: Mapping[str, int], forget: Sequence[str] = ()) -> None:
        """Set ``marks``, delete the marks of ``forget`` and end the pending send, at once."""
        self._transaction([
            ("INSERT INTO marks (series, ts_ns) VALUES (?, ?) "
             "ON CONFLICT (series) DO UPDATE SET ts_ns = excluded.ts_ns", list(marks.items())),
            ("DELETE FROM marks WHERE series = ?", [(s,) for s in forget]),
            ("DELETE FROM pending", [()]),
        ])

    def close(self) -> None:
        self._db.close()


class _ServerError(Exception):
    """The write failed; ``server_message`` is Akumuli's ``-...`` line if it sent one."""

    def __init__(self, message: str, server_message: str | None = None) -> None:
        super().__init__(message)
        self.server_message = server_message


def _read_error_line(sock: socket.socket, first: bytes) -> str:
    """The ``-...`` line that starts with ``first`` (read on, briefly, up to CRLF)."""
    data = first
    sock.settimeout(1.0)
    with contextlib.suppress(OSError):
        while b"\r\n" not in data and len(data) < 4096:
            more = sock.recv(4096)
            if not more:
                break
            data += more
    return data.partition(b"\r\n")[0][1:].decode("utf-8", errors="replace")


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
        # A send that a crash interrupted: its series are re-read before the next write.
        self._unsettled = self._store.load_pending()
        self._sock: socket.socket | None = None
        # series -> (first timestamp sent, mark before): the last write, re-read from the
        # server if its error arrives after the confirm window.
        self._last_sent: dict[str, tuple[int, int | None]] = {}
        self._last_points: list[Point] = []
        self._resend: list[Point] = []  # points of an earlier write the server lost
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
        """An error line the server sent since the last write (None: none), or reconnect."""
        if self._sock is None:
            return None
        sock = self._sock
        try:
            sock.setblocking(False)
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            self._drop_connection()
            return None
        if data.startswith(b"-"):
            message = _read_error_line(sock, data)
            self._drop_connection()
            return message
        self._drop_connection()  # closed (server restart, idle timeout) or garbage
        return None

    def _send(self, payload: bytes) -> None:
        """Send and listen ``confirm_s`` for an error; ``_ServerError`` if the write failed."""
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

    def _query(self, body: dict[str, object]) -> list[tuple[str, int]]:
        """``(canonical series, timestamp)`` rows of one select query."""
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
        if response.status != 200 or text.startswith("-"):
            raise SinkError(f"sink {self.url}: query API answered {response.status}: "
                            f"{text[:200].strip()}")
        rows: list[tuple[str, int]] = []
        for line in text.splitlines():
            if not line.strip():
                continue
            series, _, rest = line.partition(",")
            ts_text = rest.partition(",")[0].strip()
            try:
                metric, *tags = series.split()
                rows.append((" ".join([metric, *sorted(tags)]), int(ts_text)))
            except ValueError:
                raise SinkError(f"sink {self.url}: query API: cannot read row {line[:120]!r}"
                                ) from None
        return rows

    def _reconcile(self, sent: Mapping[str, tuple[int, int | None]]) -> None:
        """Set the marks of ``sent`` series to the newest point the server holds from the
        first timestamp sent on (or back to the mark before the send if it holds none)."""
        RECONCILES.labels(self.kind).inc()
        by_metric: dict[str, list[str]] = defaultdict(list)
        for series in sent:
            by_metric[series.partition(" ")[0]].append(series)
        found: dict[str, int] = {}
        for metric, names in by_metric.items():
            devices = sorted({tag[len("device="):] for name in names
                              for tag in name.split(" ")[1:] if tag.startswith("device=")})
            since = min(sent[name][0] for name in names)
            query: dict[str, object] = {
                "select": metric,
                "range": {"from": iso_timestamp(since), "to": iso_timestamp(_MAX_TS_NS)},
                "output": {"format": "csv", "timestamp": "raw"},
            }
            if devices:
                query["where"] = {"device": devices}
            wanted = set(names)
            for series, ts in self._query(query):
                if series in wanted and ts >= sent[series][0] and ts > found.get(series, -1):
                    found[series] = ts
        corrected: dict[str, int] = {}
        never_written: list[str] = []
        for series, (_, mark_before) in sent.items():
            mark = found.get(series, mark_before)
            if mark is None:
                never_written.append(series)
            else:
                corrected[series] = mark
        self._store.save(corrected, forget=never_written)
        self._marks.update(corrected)
        for series in never_written:
            self._marks.pop(series, None)

    # --- the write ------------------------------------------------------------------------

    def _count_late(self, late: int) -> None:
        if not late:
            return
        LATE_POINTS.labels(self.kind).inc(late)
        self._late_unlogged += late
        now = time.monotonic()
        if now - self._late_logged_at >= _LATE_LOG_INTERVAL_S:
            log.warning("points at or below their series' last written timestamp were not "
                        "sent (late or redelivered)",
                        extra={"fields": {"sink": self.url, "points": self._late_unlogged}})
            self._late_unlogged = 0
            self._late_logged_at = now

    def write(self, batches: Sequence[SinkBatch]) -> WriteResult:
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
        if stale_error is not None and self._last_sent:
            # The last write returned (and the feed was acknowledged) but part of it was lost:
            # put the marks right and send its missing points again with this write (kept
            # until a write succeeds, so a failing retry does not forget them).
            log.error("Akumuli reported an error after the last write was confirmed; "
                      "re-reading that write's series and resending what is missing",
                      extra={"fields": {"sink": self.url, "error": stale_error}})
            self._unsettled = {**self._last_sent, **self._unsettled}
            self._resend = self._last_points
        self._last_sent = {}
        self._last_points = []
        if self._unsettled:
            log.warning("re-reading from the server the series of a send that did not "
                        "finish", extra={"fields": {"sink": self.url,
                                                    "series": len(self._unsettled)}})
            self._reconcile(self._unsettled)  # raises if the query API is down: retried
            self._unsettled = {}
        points = self._resend + points

        late_total = 0
        for round_number in range(1, _LATE_WRITE_ROUNDS + 1):
            plan = plan_write(points, self._marks)
            # Late points of earlier rounds are counted again here: count this round only.
            late_total = plan.late
            if not plan.send:
                break
            sent = {series: (first, self._marks.get(series))
                    for series, first in plan.first_ts.items()}
            self._store.begin_send(sent)
            try:
                self._send(format_points(plan.send))
            except _ServerError as exc:
                late_write = exc.server_message is not None and "late write" in exc.server_message
                try:
                    self._reconcile(sent)
                except SinkError as reconcile_error:
                    self._unsettled = sent  # re-read before the retry sends anything
                    raise SinkError(f"{exc}; re-reading marks failed: {reconcile_error}"
                                    ) from None
                if late_write and round_number < _LATE_WRITE_ROUNDS:
                    continue
                raise SinkError(str(exc)) from None
            self._store.save(plan.new_marks)
            self._marks.update(plan.new_marks)
            self._last_sent = sent
            self._last_points = plan.send
            self._resend = []
            self._count_late(late_total)
            return WriteResult(len(plan.send), late_total)
        self._resend = []
        self._count_late(late_total)
        return WriteResult(0, late_total)

    def close(self) -> None:
        self._drop_connection()
        self._store.close()
