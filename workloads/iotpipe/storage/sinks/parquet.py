"""Data-lake sink: Parquet files partitioned by date and device class.

URL: ``parquet:///abs/dir`` (``parquet://rel/dir`` is relative). Layout (Hive style, so
pyarrow, DuckDB, Spark and Trino read it as one table with ``date`` and ``class`` columns)::

    <dir>/date=2025-11-26/class=thermostat/<store id>-<first rowid, 20 digits>.parquet

Each delivered batch is split by (UTC date of the reading's timestamp, device class) and
each part is written to its own file: first as ``.tmp-<name>`` (readers skip dot files),
fsynced, renamed into place, and the directory fsynced, so a file is either whole or absent.
The sink tails the store of record (``iotpipe.storage.tail``): each batch is one range of
store rows, and the file name is deterministic in that range's first rowid and the store's
identity (``<store id>-<first rowid, 20 digits>.parquet``; a recreated store has another
id, so it never overwrites what an earlier one wrote). A range whose write was cut short (a crash
between the cursor's pending record and its commit, or a failed write) is rewritten with the
same rows, so it replaces the same files instead of adding copies: no reading is in two
files. (Files written by older versions, named by middle id and log seq, could repeat a
reading; ``query`` still drops repeats by ``(device_id, msg_id)``.) Small files are not
compacted here.
"""

from __future__ import annotations

import os
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from iotpipe.durable import fsync_dir, fsync_file
from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import SinkBatch, SinkError, WriteResult

__all__ = ["SCHEMA", "ParquetSink"]

_TS = pa.timestamp("ns", tz="UTC")
SCHEMA = pa.schema([
    ("device_id", pa.string()),
    ("msg_id", pa.string()),
    ("ts", _TS),
    ("received", _TS),
    ("node", pa.string()),
    ("node_seq", pa.int64()),
    ("data", pa.string()),
    ("device_class", pa.string()),
    ("location", pa.string()),
    ("labels", pa.map_(pa.string(), pa.string())),
])
_COLUMNS = [f.name for f in SCHEMA]


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="") or "%00"


def _table(readings: Sequence[StoredReading]) -> pa.Table:
    return pa.Table.from_pydict({
        "device_id": [r.device_id for r in readings],
        "msg_id": [r.msg_id for r in readings],
        "ts": [r.ts_ns for r in readings],
        "received": [r.received_ns for r in readings],
        "node": [r.node for r in readings],
        "node_seq": [r.node_seq for r in readings],
        "data": [r.data for r in readings],
        "device_class": [r.device_class for r in readings],
        "location": [r.location for r in readings],
        "labels": [list(r.labels.items()) for r in readings],
    }, schema=SCHEMA)


class ParquetSink:
    kind = "parquet"

    def __init__(self, root: str | Path, *, read_only: bool = False, url: str | None = None
                 ) -> None:
        self.root = Path(root)
        self.url = url or f"parquet://{self.root}"
        if read_only:
            if not self.root.is_dir():
                raise SinkError(f"sink {self.url}: directory {str(self.root)!r} not found")
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SinkError(f"sink {self.url}: cannot create directory: {exc}") from None
        self._known_dirs: set[Path] = set()

    @classmethod
    def from_url(cls, url: str, *, read_only: bool = False) -> ParquetSink:
        path = url.partition("://")[2]
        if not path:
            raise SinkError(f"sink URL {url!r}: no directory (expected parquet:///dir)")
        return cls(path, read_only=read_only, url=url)

    def _partition_dir(self, date: str, device_class: str) -> Path:
        directory = self.root / f"date={date}" / f"class={_quote(device_class)}"
        if directory not in self._known_dirs:
            created = [p for p in (directory.parent, directory) if not p.exists()]
            directory.mkdir(parents=True, exist_ok=True)
            for new_dir in created:  # make the new directory entries durable
                fsync_dir(new_dir.parent)
            self._known_dirs.add(directory)
        return directory

    def _write_file(self, directory: Path, name: str, readings: Sequence[StoredReading]) -> None:
        final = directory / name
        tmp = directory / f".tmp-{name}"
        pq.write_table(_table(readings), tmp, compression="zstd")
        fsync_file(tmp)
        os.replace(tmp, final)
        fsync_dir(directory)

    def write(self, batches: Sequence[SinkBatch], *, recovering: bool = False) -> WriteResult:
        # A rewrite of the same range replaces the same files: ``recovering`` needs nothing.
        written = 0
        try:
            for batch in batches:
                parts: dict[tuple[str, str], list[StoredReading]] = defaultdict(list)
                for reading in batch.readings:
                    day = datetime.fromtimestamp(reading.ts_ns // 1_000_000_000, UTC)
                    parts[(day.strftime("%Y-%m-%d"), reading.device_class)].append(reading)
                name = f"{_quote(batch.middle)}-{batch.first:020d}.parquet"
                for (date, device_class), readings in parts.items():
                    self._write_file(self._partition_dir(date, device_class), name, readings)
                    written += len(readings)
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(f"sink {self.url}: write failed: {exc}") from None
        return WriteResult(written, 0)

    def _read(self, device_id: str | None, since_ns: int | None, until_ns: int | None
              ) -> pa.Table:
        try:
            dataset = ds.dataset(self.root, format="parquet", partitioning="hive",
                                 schema=SCHEMA)
            condition: ds.Expression | None = None
            parts: list[ds.Expression] = []
            if device_id is not None:
                parts.append(ds.field("device_id") == device_id)
            if since_ns is not None:
                parts.append(ds.field("ts") >= pa.scalar(since_ns, type=_TS))
            if until_ns is not None:
                parts.append(ds.field("ts") < pa.scalar(until_ns, type=_TS))
            for part in parts:
                condition = part if condition is None else condition & part
            table = dataset.to_table(columns=_COLUMNS, filter=condition)
        except (OSError, pa.ArrowException) as exc:
            raise SinkError(f"sink {self.url}: read failed: {exc}") from None
        if table.num_rows == 0:
            return table
        # Drop repeats left by redeliveries with other boundaries (see the module docs).
        keyed = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
        first_rows = keyed.group_by(["device_id", "msg_id"], use_threads=False).aggregate(
            [("_row", "min")])["_row_min"]
        table = table.take(pc.sort_indices(first_rows))
        return table.sort_by([("ts", "ascending"), ("device_id", "ascending"),
                              ("msg_id", "ascending")])

    def query(
        self, device_id: str | None, since_ns: int | None, until_ns: int | None, limit: int | None
    ) -> Iterator[StoredReading]:
        table = self._read(device_id, since_ns, until_ns)
        if limit is not None:
            table = table.slice(0, limit)
        columns = {name: table[name].to_pylist() for name in _COLUMNS
                   if name not in ("ts", "received")}
        ts = table["ts"].cast(pa.int64()).to_pylist()
        received = table["received"].cast(pa.int64()).to_pylist()
        for i in range(table.num_rows):
            yield StoredReading(
                columns["device_id"][i], columns["msg_id"][i], ts[i], received[i],
                columns["node"][i], columns["node_seq"][i], columns["data"][i],
                columns["device_class"][i], columns["location"][i], dict(columns["labels"][i]),
            )

    def count(self, device_id: str | None, since_ns: int | None, until_ns: int | None) -> int:
        return int(self._read(device_id, since_ns, until_ns).num_rows)

    def close(self) -> None:
        self._known_dirs.clear()
