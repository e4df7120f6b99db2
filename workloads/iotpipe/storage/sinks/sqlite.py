"""The embedded sink: one SQLite file in WAL mode, durable at every commit.

``synchronous=FULL`` in WAL mode syncs the WAL at every commit, so a committed batch
survives a power cut. A delivered batch (or several that arrived together) is one
transaction of ``INSERT OR IGNORE`` rows; ``UNIQUE(device_id, msg_id)`` makes a redelivered
reading a no-op, which is what makes the feed's at-least-once delivery exactly-once here.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import orjson

from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import SinkBatch, SinkError, WriteResult

__all__ = ["SCHEMA_VERSION", "LateRow", "SqliteSink"]

SCHEMA_VERSION = 2  # 2: sink_cursors and late_points

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    device_id    TEXT    NOT NULL,
    msg_id       TEXT    NOT NULL,
    ts_ns        INTEGER NOT NULL,
    received_ns  INTEGER NOT NULL,
    node         TEXT    NOT NULL,
    node_seq     INTEGER NOT NULL,
    data         TEXT    NOT NULL,
    device_class TEXT    NOT NULL,
    location     TEXT    NOT NULL,
    labels       TEXT    NOT NULL,
    UNIQUE (device_id, msg_id)
);
CREATE INDEX IF NOT EXISTS readings_device_ts ON readings (device_id, ts_ns);
-- Each tailing sink's durable position in this table (see iotpipe.storage.tail): rows with
-- rowid <= done are in that sink; pending_to is a range being written (recovered at start).
CREATE TABLE IF NOT EXISTS sink_cursors (
    sink       TEXT    PRIMARY KEY,
    done       INTEGER NOT NULL,
    pending_to INTEGER
);
-- The store's identity (key 'store_id'): names its rows' ranges in other sinks (Parquet
-- files), so a recreated store never overwrites what an earlier one wrote there.
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- Values a sink refused for good (Akumuli's late writes): kept, and counted apart from
-- redeliveries. One row per (sink, reading, field).
CREATE TABLE IF NOT EXISTS late_points (
    sink       TEXT    NOT NULL,
    device_id  TEXT    NOT NULL,
    msg_id     TEXT    NOT NULL,
    ts_ns      INTEGER NOT NULL,
    field      TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    reason     TEXT    NOT NULL,
    noted_ns   INTEGER NOT NULL,
    UNIQUE (sink, device_id, msg_id, field)
);
"""

class LateRow(NamedTuple):
    """One row of ``late_points``: a value ``sink`` refused for good, and why."""

    sink: str
    device_id: str
    msg_id: str
    ts_ns: int
    field: str
    value: str
    reason: str


_INSERT = (
    "INSERT OR IGNORE INTO readings (device_id, msg_id, ts_ns, received_ns, node, node_seq,"
    " data, device_class, location, labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_COLUMNS = ("device_id, msg_id, ts_ns, received_ns, node, node_seq, data, device_class,"
            " location, labels")


def _where(
    device_id: str | None, since_ns: int | None, until_ns: int | None
) -> tuple[str, list[object]]:
    clauses: list[str] = []
    params: list[object] = []
    if device_id is not None:
        clauses.append("device_id = ?")
        params.append(device_id)
    if since_ns is not None:
        clauses.append("ts_ns >= ?")
        params.append(since_ns)
    if until_ns is not None:
        clauses.append("ts_ns < ?")
        params.append(until_ns)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class SqliteSink:
    kind = "sqlite"

    def __init__(self, path: str | Path, *, read_only: bool = False, url: str | None = None
                 ) -> None:
        self.path = Path(path)
        self.url = url or f"sqlite://{self.path}"
        try:
            if read_only:
                if not self.path.exists():
                    raise SinkError(f"sink {self.url}: database file {str(self.path)!r} not found")
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                           isolation_level=None, check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Opened in one thread and used in another (one at a time) is fine here.
                self._db = sqlite3.connect(self.path, isolation_level=None,
                                           check_same_thread=False)
                mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise SinkError(f"sink {self.url}: cannot switch to WAL mode (got {mode})")
                self._db.execute("PRAGMA synchronous=FULL")
                # The two indexes are updated at random places per row: a 64 MiB page cache
                # (default 2 MiB) keeps those pages in memory between commits.
                self._db.execute("PRAGMA cache_size=-65536")
                self._db.executescript(_SCHEMA)
                self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES "
                                 "('store_id', ?)", (secrets.token_hex(6),))
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._db.execute("PRAGMA busy_timeout=10000")
        except sqlite3.Error as exc:
            raise SinkError(f"sink {self.url}: cannot open database: {exc}") from None

    @classmethod
    def from_url(cls, url: str, *, read_only: bool = False) -> SqliteSink:
        path = url.partition("://")[2]
        if not path:
            raise SinkError(f"sink URL {url!r}: no database path (expected sqlite:///path/x.db)")
        return cls(path, read_only=read_only, url=url)

    def write(self, batches: Sequence[SinkBatch], *, recovering: bool = False) -> WriteResult:
        # INSERT OR IGNORE makes every write a safe rewrite: ``recovering`` changes nothing.
        labels_json: dict[int, str] = {}  # labels dicts are shared per registry entry

        def rows() -> Iterator[tuple[object, ...]]:
            for batch in batches:
                for r in batch.readings:
                    key = id(r.labels)
                    text = labels_json.get(key)
                    if text is None:
                        text = orjson.dumps(r.labels, option=orjson.OPT_SORT_KEYS).decode()
                        labels_json[key] = text
                    yield (r.device_id, r.msg_id, r.ts_ns, r.received_ns, r.node, r.node_seq,
                           r.data, r.device_class, r.location, text)

        db = self._db
        try:
            before = db.total_changes
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(_INSERT, rows())
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            new = db.total_changes - before
            return WriteResult(new, sum(len(b.readings) for b in batches) - new)
        except sqlite3.Error as exc:
            raise SinkError(f"sink {self.url}: write failed: {exc}") from None

    def query(
        self, device_id: str | None, since_ns: int | None, until_ns: int | None, limit: int | None
    ) -> Iterator[StoredReading]:
        where, params = _where(device_id, since_ns, until_ns)
        sql = f"SELECT {_COLUMNS} FROM readings{where} ORDER BY ts_ns, device_id, msg_id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        try:
            cursor = self._db.execute(sql, params)
            for row in cursor:
                yield StoredReading(*row[:9], orjson.loads(row[9]))
        except sqlite3.Error as exc:
            raise SinkError(f"sink {self.url}: query failed: {exc}") from None

    def count(self, device_id: str | None, since_ns: int | None, until_ns: int | None) -> int:
        where, params = _where(device_id, since_ns, until_ns)
        try:
            return int(self._db.execute(f"SELECT count(*) FROM readings{where}", params)
                       .fetchone()[0])
        except sqlite3.Error as exc:
            raise SinkError(f"sink {self.url}: query failed: {exc}") from None

    def prune(self, upto_rowid: int | None, received_before_ns: int) -> int:
        """Delete readings with rowid <= ``upto_rowid`` (None: any) received before the
        cutoff; the newest row stays, so rowids are never reused (tailing cursors rely on
        that). Returns how many were deleted."""
        sql = ("DELETE FROM readings WHERE received_ns < ? "
               "AND rowid < (SELECT max(rowid) FROM readings)")
        params: list[object] = [received_before_ns]
        if upto_rowid is not None:
            sql += " AND rowid <= ?"
            params.append(upto_rowid)
        try:
            return int(self._db.execute(sql, params).rowcount)
        except sqlite3.Error as exc:
            raise SinkError(f"sink {self.url}: prune failed: {exc}") from None

    def late_points(self, sink: str | None = None) -> list[LateRow]:
        """The values sinks refused for good (``late_points``), oldest reading first."""
        sql = ("SELECT sink, device_id, msg_id, ts_ns, field, value, reason FROM late_points"
               + (" WHERE sink = ?" if sink is not None else "") + " ORDER BY ts_ns, rowid")
        try:
            rows = self._db.execute(sql, [] if sink is None else [sink]).fetchall()
        except sqlite3.Error as exc:
            raise SinkError(f"sink {self.url}: query failed: {exc}") from None
        return [LateRow(*row) for row in rows]

    def close(self) -> None:
        self._db.close()
