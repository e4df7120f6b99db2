"""Per-series high-water marks of an Akumuli sink, kept in a small SQLite file.

The mark of a series is the newest timestamp the sink knows the server holds; it decides
which points are late (``points.plan_write``). WAL with ``synchronous=FULL``: a mark is
durable once ``save`` returns, so a restart never sends a point the server would refuse.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path

from iotpipe.storage.sinks import SinkError

__all__ = ["MarksStore"]


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
