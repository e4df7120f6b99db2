"""Sinks that tail the store of record, each on its own durable cursor.

The storage tier writes every delivery to the store of record (SQLite) and acknowledges
the feed once that commit is durable. Every other sink (VictoriaMetrics, Parquet, Akumuli,
another SQLite file) runs in its own thread and copies rows from the store of record in
``rowid`` order. Its position is a row of the store's ``sink_cursors`` table:

1. read the next rows after ``done`` (at most ``batch_rows``);
2. commit ``pending_to`` = the last rowid of that range (durable before anything is sent);
3. ``sink.write`` the range; a failure retries the same range with ``recovering=True``
   (back off 0.1 s doubling to 5 s), so the sink reads back what it already holds;
4. commit ``done = pending_to``, ``pending_to = NULL`` and the range's late points.

A process killed between 2 and 4 finds ``pending_to`` at start and rewrites exactly that
range with ``recovering=True``. So each sink holds every stored reading once, and a sink
that is down, refusing or slow holds up nothing but itself: the feed is acknowledged on the
store of record alone, and the middle's log is never kept for a lagging sink. Its backlog is
the store of record itself (rows are immutable and kept; see ``StorageSettings.
store_retention`` for the case where they are not), so it grows only with the disk the
store uses anyway; the sink's lag and state are metrics and ``/readyz`` detail.

A sink seen for the first time (no cursor row) starts at the beginning of the store: it is
back-filled with everything the store of record holds, every range written with
``recovering=True`` until it has caught up once (the sink may hold some of it already: a
store of record that was recreated, or a sink that was configured before). The cursor is
keyed by ``cursor_key(url)``: the URL without its tuning options (``confirm_ms``,
``query_port``, ``marks``), so changing those does not start a back-fill.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import LatePoint, Sink, SinkBatch, SinkError

__all__ = ["CursorStore", "SinkWorker", "TailMetrics", "TailState", "cursor_key"]

log = logging.getLogger("iotpipe.storage.tail")

_COLUMNS = ("rowid, device_id, msg_id, ts_ns, received_ns, node, node_seq, data, "
            "device_class, location, labels")
_IDLE_WAIT_S = 0.5
_MAX_BACKOFF_S = 5.0
_RESTART_WAIT_S = 5.0  # after an unexpected error in the worker itself


# URL options that tune how a sink talks, not where the data goes.
_TUNING_OPTIONS = frozenset({"confirm_ms", "query_port", "marks"})


def cursor_key(url: str) -> str:
    """The identity of a sink's data: its URL without tuning options (sorted query)."""
    base, _, query = url.partition("?")
    options = sorted((k, v) for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True)
                     if k not in _TUNING_OPTIONS)
    return base + ("?" + urllib.parse.urlencode(options) if options else "")


def _row_reading(row: Sequence[object]) -> StoredReading:
    return StoredReading(*row[1:10], orjson.loads(str(row[10])))  # type: ignore[arg-type]


class CursorStore:
    """One sink's cursor and the rows it reads, on its own connection to the store."""

    def __init__(self, path: Path, sink_url: str) -> None:
        self.sink_url = cursor_key(sink_url)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        # True when this sink had no cursor: it is back-filled as a recovery (see above).
        self.created = self._db.execute(
            "INSERT OR IGNORE INTO sink_cursors (sink, done, pending_to) VALUES (?, 0, NULL)",
            (self.sink_url,)).rowcount == 1

    def store_id(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        return "store" if row is None else str(row[0])

    def cursor(self) -> tuple[int, int | None]:
        done, pending_to = self._db.execute(
            "SELECT done, pending_to FROM sink_cursors WHERE sink = ?", (self.sink_url,)
        ).fetchone()
        return int(done), None if pending_to is None else int(pending_to)

    def rows_after(self, done: int, limit: int) -> list[tuple[int, StoredReading]]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM readings WHERE rowid > ? "
                                f"ORDER BY rowid LIMIT ?", (done, limit)).fetchall()
        return [(int(row[0]), _row_reading(row)) for row in rows]

    def rows_between(self, done: int, last: int) -> list[tuple[int, StoredReading]]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM readings WHERE rowid > ? AND "
                                f"rowid <= ? ORDER BY rowid", (done, last)).fetchall()
        return [(int(row[0]), _row_reading(row)) for row in rows]

    def set_pending(self, last: int) -> None:
        self._db.execute("UPDATE sink_cursors SET pending_to = ? WHERE sink = ?",
                         (last, self.sink_url))

    def finish(self, last: int, late: Sequence[LatePoint]) -> None:
        """The range up to ``last`` is in the sink: advance, and keep its late points."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            now = time.time_ns()
            db.executemany(
                "INSERT OR IGNORE INTO late_points (sink, device_id, msg_id, ts_ns, field, "
                "value, reason, noted_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(self.sink_url, p.reading.device_id, p.reading.msg_id, p.reading.ts_ns,
                  p.field, p.value, p.reason, now) for p in late])
            db.execute("UPDATE sink_cursors SET done = ?, pending_to = NULL WHERE sink = ?",
                       (last, self.sink_url))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def backlog(self, done: int) -> tuple[int, int | None]:
        """(rows after ``done`` by rowid distance, received_ns of the oldest of them)."""
        top = self._db.execute("SELECT max(rowid) FROM readings").fetchone()[0]
        if top is None or top <= done:
            return 0, None
        oldest = self._db.execute("SELECT received_ns FROM readings WHERE rowid > ? "
                                  "ORDER BY rowid LIMIT 1", (done,)).fetchone()
        return int(top) - done, None if oldest is None else int(oldest[0])

    def close(self) -> None:
        self._db.close()


class TailMetrics:
    """Per-sink metrics of the tailing sinks (labelled by sink kind, like the tier's others).

    ``written``, ``duplicates``, ``errors`` and ``seconds`` are the tier's per-sink counters,
    shared with the store of record's write on the feed path.
    """

    def __init__(self, registry: CollectorRegistry, written: Counter, duplicates: Counter,
                 errors: Counter, seconds: Histogram) -> None:
        self.written, self.duplicates, self.errors, self.seconds = (
            written, duplicates, errors, seconds)
        self.lag_rows = Gauge("iotpipe_storage_sink_lag_rows",
                              "Rows of the store of record not yet in this sink", ["sink"],
                              registry=registry)
        self.lag_seconds = Gauge(
            "iotpipe_storage_sink_lag_seconds",
            "Age (since ingest received it) of the oldest row not yet in this sink (0: none)",
            ["sink"], registry=registry)
        self.up = Gauge("iotpipe_storage_sink_up",
                        "1 while the sink's last write succeeded, 0 while it fails", ["sink"],
                        registry=registry)
        self.cursor = Gauge("iotpipe_storage_sink_cursor",
                            "Last store rowid this sink holds", ["sink"], registry=registry)
        self.late = Counter("iotpipe_storage_late_points_total",
                            "Values a sink refused for good (kept in late_points)", ["sink"],
                            registry=registry)
        self.recoveries = Counter(
            "iotpipe_storage_sink_recoveries_total",
            "Ranges written again after a failed or interrupted write", ["sink"],
            registry=registry)


@dataclass
class TailState:
    """What ``/readyz`` shows for one sink."""

    sink: str
    state: str = "starting"  # starting, catching up, caught up, failing
    done: int = 0
    lag_rows: int = 0
    lag_seconds: float = 0.0
    error: str = ""

    def describe(self) -> str:
        text = (f"sink {self.sink}: {self.state}, cursor {self.done}, lag {self.lag_rows} rows"
                f" / {self.lag_seconds:.1f} s")
        return text + (f", last error: {self.error}" if self.error else "")


class SinkWorker:
    """Copies the store of record into one sink on a thread of its own."""

    def __init__(self, sink: Sink, store_path: Path, metrics: TailMetrics, *,
                 batch_rows: int = 2000) -> None:
        self.sink = sink
        self.store_path = store_path
        self.metrics = metrics
        self.batch_rows = batch_rows
        self.state = TailState(sink.url)
        self.wake = threading.Event()  # set by the feed path after each store commit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sink-{sink.kind}",
                                        daemon=True)
        self._cursors = CursorStore(store_path, sink.url)
        done, _ = self._cursors.cursor()
        self.state.done = done

    def start(self) -> SinkWorker:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._cursors.close()

    @property
    def healthy(self) -> bool:
        return self.state.state != "failing"

    def _report(self, done: int) -> None:
        lag_rows, oldest_ns = self._cursors.backlog(done)
        lag_s = 0.0 if oldest_ns is None else max(0.0, (time.time_ns() - oldest_ns) / 1e9)
        self.state.done, self.state.lag_rows, self.state.lag_seconds = done, lag_rows, lag_s
        label = self.sink.kind
        self.metrics.lag_rows.labels(label).set(lag_rows)
        self.metrics.lag_seconds.labels(label).set(lag_s)
        self.metrics.cursor.labels(label).set(done)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._loop()
                return
            except Exception as exc:  # e.g. the store locked or unreadable for a while
                # Shown as a failing sink, never a silent dead thread; the loop starts over
                # from the durable cursor (a pending range is then rewritten as a recovery).
                log.exception("sink worker failed; restarting it",
                              extra={"fields": {"sink": self.sink.url}})
                self.state.state, self.state.error = "failing", f"worker error: {exc}"
                self.metrics.up.labels(self.sink.kind).set(0)
                self._stop.wait(_RESTART_WAIT_S)

    def _loop(self) -> None:
        cursors = self._cursors
        label = self.sink.kind
        done, pending_to = cursors.cursor()
        store_id = cursors.store_id()
        recovering = pending_to is not None
        backfill = cursors.created  # it may hold some of the store already
        if backfill:
            log.info("a sink without a cursor: back-filling it from the store of record, "
                     "reading back before each write", extra={"fields": {"sink": self.sink.url}})
        if recovering:
            log.warning("rewriting a range whose write was interrupted", extra={"fields": {
                "sink": self.sink.url, "after": done, "to": pending_to}})
        backoff_s = 0.1
        self.metrics.up.labels(label).set(1)
        while not self._stop.is_set():
            if pending_to is None:
                rows = cursors.rows_after(done, self.batch_rows)
                if not rows:
                    backfill = False
                    self.state.state = "caught up"
                    self._report(done)
                    self.wake.wait(_IDLE_WAIT_S)
                    self.wake.clear()
                    continue
                pending_to = rows[-1][0]
                cursors.set_pending(pending_to)
            else:
                rows = cursors.rows_between(done, pending_to)
            if self.state.state != "failing":
                self.state.state = "catching up"
            batch = SinkBatch(store_id, done + 1, [reading for _, reading in rows])
            if recovering:
                self.metrics.recoveries.labels(label).inc()
            started = time.perf_counter()
            try:
                result = self.sink.write([batch], recovering=recovering or backfill)
            except SinkError as exc:
                self.metrics.errors.labels(label).inc()
                recovering = True  # part of the range may be stored: read back first
                if self.state.state != "failing":
                    log.error("sink write failed; retrying the same range", extra={
                        "fields": {"sink": self.sink.url, "error": str(exc)}})
                self.state.state, self.state.error = "failing", str(exc)
                self.metrics.up.labels(label).set(0)
                self._report(done)
                if self._stop.wait(backoff_s):
                    return
                backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
                continue
            cursors.finish(pending_to, result.late)
            self.metrics.seconds.labels(label).observe(time.perf_counter() - started)
            self.metrics.written.labels(label).inc(result.written)
            if result.duplicates:
                self.metrics.duplicates.labels(label).inc(result.duplicates)
            if result.late:
                self.metrics.late.labels(label).inc(len(result.late))
            if self.state.state == "failing":
                log.info("sink writes succeed again", extra={"fields": {"sink": self.sink.url}})
                self.state.error = ""
                self.metrics.up.labels(label).set(1)
            self.state.state = "catching up"
            done, pending_to, recovering, backoff_s = pending_to, None, False, 0.1
            self._report(done)
