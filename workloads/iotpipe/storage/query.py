"""``iotpipe query``: read stored readings back by device and time range.

Times (``--since``, ``--until``) are RFC 3339 (``2026-11-26T10:00:00.5Z``; up to nanosecond
fractions; a time without an offset is taken as UTC) or epoch seconds (``1764151200.5``).
The range is ``since <= ts < until`` on the device's own timestamp. Output is one JSON
object per line with ``--json``, else an aligned table; ``--count`` prints the number of
matching readings instead.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
from pydantic import Field

from iotpipe.settings import TierSettings, parse_settings, tier_config
from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import ReadableSink, SinkError, open_sink

__all__ = ["QuerySettings", "format_ts", "main", "parse_time", "reading_to_json"]

_EPOCH = re.compile(r"^[+-]?\d+(\.\d+)?$")
_RFC3339 = re.compile(
    r"^(?P<base>\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?)(\.(?P<frac>\d+))?"
    r"(?P<tz>Z|[+-]\d\d:?\d\d)?$", re.IGNORECASE)


# Where `iotpipe up` (and so `make up`) keeps its store, relative to the working directory.
DEFAULT_DB = "./data/store/readings.db"


class QuerySettings(TierSettings):
    """Read stored readings by device and time range."""

    model_config = tier_config("iotpipe query", "IOTPIPE_QUERY_", {"json_lines": "json"})

    db: str | None = Field(None, description="path of the embedded SQLite store (default: "
                                             f"{DEFAULT_DB}, where `iotpipe up` keeps it)")
    sink: str | None = Field(None, description="sink URL to read from instead of --db "
                                               "(e.g. sqlite:///var/lib/iotpipe/store/readings.db)")
    device: str | None = Field(None, description="device id (default: every device)")
    since: str | None = Field(None, description="from this time on (RFC 3339 or epoch seconds)")
    until: str | None = Field(None, description="before this time (RFC 3339 or epoch seconds)")
    limit: int | None = Field(None, ge=1, description="print at most this many readings")
    # Named json_lines because "json" shadows a pydantic method; the flag is still --json.
    json_lines: bool = Field(False,
                             description="print JSON lines instead of a table")
    count: bool = Field(False, description="print only the number of matching readings")

    def url(self) -> str:
        return self.sink if self.sink is not None else f"sqlite://{self.db}"


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch from RFC 3339 or epoch seconds; ValueError names the text."""
    value = text.strip()
    if _EPOCH.match(value):
        whole, _, frac = value.partition(".")
        sign = -1 if whole.startswith("-") else 1
        ns = int(whole) * 1_000_000_000 + sign * int((frac + "0" * 9)[:9] or 0)
        return ns
    match = _RFC3339.match(value.replace(" ", "T", 1))
    if match is None:
        raise ValueError(f"time {text!r} is neither RFC 3339 nor epoch seconds")
    tz = match.group("tz") or "+00:00"
    if tz.upper() == "Z":
        tz = "+00:00"
    try:
        base = datetime.fromisoformat(match.group("base") + tz)
    except ValueError:
        raise ValueError(f"time {text!r} is neither RFC 3339 nor epoch seconds") from None
    frac = match.group("frac") or ""
    if len(frac) > 9:
        raise ValueError(f"time {text!r}: more than nanosecond precision")
    return int(base.timestamp()) * 1_000_000_000 + int((frac + "0" * 9)[:9])


def format_ts(ts_ns: int) -> str:
    """RFC 3339 in UTC with nanoseconds."""
    seconds, nanos = divmod(ts_ns, 1_000_000_000)
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def reading_to_json(reading: StoredReading) -> dict[str, object]:
    try:
        data: object = orjson.loads(reading.data)
    except orjson.JSONDecodeError:
        data = reading.data  # stored as text; show it rather than fail the whole query
    return {
        "device_id": reading.device_id,
        "msg_id": reading.msg_id,
        "ts": format_ts(reading.ts_ns),
        "ts_ns": reading.ts_ns,
        "data": data,
        "class": reading.device_class,
        "location": reading.location,
        "labels": reading.labels,
        "node": reading.node,
        "node_seq": reading.node_seq,
    }


def _print_table(readings: list[StoredReading]) -> None:
    header = ("ts", "device_id", "msg_id", "class", "location", "data")
    rows = [(format_ts(r.ts_ns), r.device_id, r.msg_id, r.device_class, r.location, r.data)
            for r in readings]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header[:-1])]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
              + "  " + row[-1])


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(QuerySettings, argv)
    if settings.db is not None and settings.sink is not None:
        print("iotpipe query: error: give one of --db PATH or --sink URL, not both",
              file=sys.stderr)
        return 2
    if settings.db is None and settings.sink is None:
        settings.db = DEFAULT_DB
    try:
        since_ns = None if settings.since is None else parse_time(settings.since)
        until_ns = None if settings.until is None else parse_time(settings.until)
    except ValueError as exc:
        print(f"iotpipe query: error: {exc}", file=sys.stderr)
        return 2
    try:
        sink = open_sink(settings.url(), read_only=True)
    except SinkError as exc:
        print(f"iotpipe query: error: {exc}", file=sys.stderr)
        return 2
    try:
        if not isinstance(sink, ReadableSink):
            print(f"iotpipe query: error: sink {settings.url()!r} cannot be read back "
                  f"(readable: sqlite://, parquet://)", file=sys.stderr)
            return 2
        if settings.count:
            print(sink.count(settings.device, since_ns, until_ns))
            return 0
        if settings.json_lines:
            out = sys.stdout.buffer
            for reading in sink.query(settings.device, since_ns, until_ns, settings.limit):
                out.write(orjson.dumps(reading_to_json(reading)) + b"\n")
            out.flush()
        else:
            _print_table(list(sink.query(settings.device, since_ns, until_ns, settings.limit)))
        return 0
    except SinkError as exc:
        print(f"iotpipe query: error: {exc}", file=sys.stderr)
        return 1
    finally:
        sink.close()
