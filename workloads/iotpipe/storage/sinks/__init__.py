"""Storage sinks, chosen by URL; several can be active at once.

Every sink implements ``Sink``: ``write(batches)`` returns only once the rows are durable
in that sink (the storage tier acknowledges the feed after every sink returned), and must be
idempotent, because the feed is at-least-once and a redelivered batch must store nothing
twice. Sinks that can read rows back also implement ``ReadableSink`` (``iotpipe query``).

URL schemes:
  ``sqlite:///abs/path/readings.db`` (``sqlite://rel/path.db`` is relative): embedded default;
  ``victoriametrics://host:port``: VictoriaMetrics, Influx line protocol on ``/write``;
  ``parquet:///abs/dir``: a data lake of Parquet files partitioned by date and class;
  ``akumuli://host[:8282]``: Akumuli, RESP-style writes on TCP (see ``sinks.akumuli``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from iotpipe.storage.enrich import StoredReading

__all__ = [
    "ReadableSink",
    "Sink",
    "SinkBatch",
    "SinkError",
    "WriteResult",
    "open_sink",
    "sink_scheme",
]


class SinkError(Exception):
    """A sink cannot be opened or a write failed; the message names the sink URL."""


class SinkBatch(NamedTuple):
    """The readings of one feed delivery: log seqs ``first ..`` of middle ``middle``."""

    middle: str
    first: int
    readings: Sequence[StoredReading]


class WriteResult(NamedTuple):
    written: int  # readings (or points) newly written
    duplicates: int  # readings the sink already held (0 where a sink cannot tell)


class Sink(Protocol):
    url: str
    kind: str  # the URL scheme, used as the metrics label

    def write(self, batches: Sequence[SinkBatch]) -> WriteResult:
        """Store all readings durably (idempotently), or raise ``SinkError``."""
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
