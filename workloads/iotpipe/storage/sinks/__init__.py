"""Storage sinks, chosen by URL; several can be active at once.

Every sink implements ``Sink``: ``write(batches, recovering=...)`` returns only once the rows
are durable in that sink. The store of record (the first ``sqlite://`` sink) is written on
the feed path and must be idempotent (``INSERT OR IGNORE``): the feed is at-least-once.
Every other sink tails the store of record on its own durable cursor (``iotpipe.storage.tail``)
and sees each range of rows once, except a range whose write may have been cut short (a
failed write, or a crash between the "pending" record and the cursor commit): that range is
written again with ``recovering=True``, and the sink must then store only what it lacks
(read back, or overwrite the same files). Points a sink refuses for good (Akumuli's late
writes) come back in ``WriteResult.late`` and are kept in the store's ``late_points`` table.
Sinks that can read rows back also implement ``ReadableSink`` (``iotpipe query``).

URL schemes:
  ``sqlite:///abs/path/readings.db`` (``sqlite://rel/path.db`` is relative): embedded default;
  ``victoriametrics://host:port``: VictoriaMetrics, Influx line protocol on ``/write``;
  ``parquet:///abs/dir``: a data lake of Parquet files partitioned by date and class;
  ``akumuli://host[:8282]``: Akumuli, RESP-style writes on TCP (see ``sinks.akumuli``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from iotpipe.storage.enrich import StoredReading

__all__ = [
    "LatePoint",
    "ReadableSink",
    "Sink",
    "SinkBatch",
    "SinkError",
    "WriteResult",
    "leaf_values",
    "open_sink",
    "sink_scheme",
]


class SinkError(Exception):
    """A sink cannot be opened or a write failed; the message names the sink URL."""


class SinkBatch(NamedTuple):
    """Readings written together. For the store of record: one feed delivery (log seqs
    ``first ..`` of middle ``middle``); for a tailing sink: one range of store rows (rowids
    ``first ..`` of the store whose identity is ``middle``), the same on every rewrite."""

    middle: str
    first: int
    readings: Sequence[StoredReading]


class LatePoint(NamedTuple):
    """One value a sink refused for good (e.g. older than its series' newest point)."""

    reading: StoredReading
    field: str  # the data field (flattened name) that was refused
    value: str  # the value as text (e.g. ``-36.0``), as the sink would have stored it
    reason: str  # why, in words a user can act on


class WriteResult(NamedTuple):
    written: int  # readings (or points) newly written
    duplicates: int  # readings (or points) the sink already held (0 where it cannot tell)
    late: Sequence[LatePoint] = ()  # refused for good; kept in the store's late_points


class Sink(Protocol):
    url: str
    kind: str  # the URL scheme, used as the metrics label

    def write(self, batches: Sequence[SinkBatch], *, recovering: bool = False) -> WriteResult:
        """Store all readings durably, or raise ``SinkError``.

        ``recovering``: part of these readings may be stored already (an earlier write of
        the same range failed or was cut by a crash); store only what is missing.
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class ReadableSink(Protocol):
    url: str

    def query(
        self, device_id: str | None, since_ns: int | None, until_ns: int | None, limit: int | None
    ) -> Iterator[StoredReading]:
        """Readings of ``device_id`` (all devices if None) with since <= ts < until, by time."""
        ...

    def count(self, device_id: str | None, since_ns: int | None, until_ns: int | None) -> int: ...

    def close(self) -> None: ...


def leaf_values(data: object, encode: Callable[[object], str | None], prefix: str = ""
                ) -> Iterator[tuple[str, str | None]]:
    """``(field name, encode(value))`` for every leaf of a reading's data object.

    Nested objects are flattened with ``_`` (``{"a": {"b": 1}}`` is field ``a_b``); ``encode``
    gives the sink's form of a value, or None when the sink cannot store it.
    """
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from leaf_values(value, encode, f"{name}_")
        else:
            yield name, encode(value)


def take_matching(values: list[float] | None, value: float, rel_tol: float = 1e-9) -> bool:
    """Remove ``value`` from ``values`` (what a read-back found at one series and time) when
    the server holds it there; True if it did.

    Servers print float64 values a little rounded, so values this close count as one.
    """
    if not values:
        return False
    for i, held in enumerate(values):
        if math.isclose(held, value, rel_tol=rel_tol, abs_tol=1e-300):
            del values[i]
            return True
    return False


def sink_scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise SinkError(f"sink URL {url!r} has no scheme (expected e.g. sqlite:///path/readings.db)")
    return scheme.lower()


def open_sink(url: str, *, read_only: bool = False, state_dir: Path | None = None) -> Sink:
    """Open the sink named by ``url``; an unknown scheme is a ``SinkError`` naming the URL.

    ``state_dir`` is where a sink keeps its own bookkeeping (the storage tier's data dir).
    """
    scheme = sink_scheme(url)
    if scheme == "sqlite":
        from iotpipe.storage.sinks.sqlite import SqliteSink

        return SqliteSink.from_url(url, read_only=read_only)
    if scheme == "victoriametrics":
        from iotpipe.storage.sinks.victoriametrics import VictoriaMetricsSink

        return VictoriaMetricsSink.from_url(url)
    if scheme == "parquet":
        from iotpipe.storage.sinks.parquet import ParquetSink

        return ParquetSink.from_url(url, read_only=read_only)
    if scheme == "akumuli":
        from iotpipe.storage.sinks.akumuli import AkumuliSink

        return AkumuliSink.from_url(url, state_dir=state_dir)
    raise SinkError(
        f"sink URL {url!r}: unknown scheme {scheme!r} "
        f"(supported: sqlite://, victoriametrics://, parquet://, akumuli://)"
    )
