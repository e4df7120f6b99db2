"""VictoriaMetrics sink: Influx line protocol POSTed to ``/write``.

URL: ``victoriametrics://host:8428`` (plain HTTP; ``?measurement=NAME`` changes the
measurement, default ``iotpipe``). Each reading becomes one line::

    iotpipe,device_id=therm-1,class=thermostat,location=lab,floor=3 t=21.5,on=1i <ts_ns>

Tags are ``device_id``, ``class``, ``location`` and the registry labels (a label named like
one of the first three is dropped). Fields are the numeric and boolean values of the
reading's data object; nested objects are flattened with ``_`` (``{"a": {"b": 1}}`` ->
``a_b``); strings, lists and nulls are skipped (counted in
``iotpipe_storage_victoriametrics_skipped_values_total``), since VictoriaMetrics stores
numbers only. Integers beyond int64 are sent as floats: VictoriaMetrics would skip the whole
line otherwise, and still answer 204.
A reading without a numeric value writes nothing here (it is still in the other sinks).
VictoriaMetrics names the series ``<measurement>_<field>``.

Exactly once, whatever VictoriaMetrics' flags. VictoriaMetrics stores a sample sent twice
twice (unless it runs with ``-dedup.minScrapeInterval``), so nothing may be sent twice. The
sink tails the store of record (``iotpipe.storage.tail``), which hands it every row once;
only a range whose write may have been cut short (a failed request, or a crash between the
cursor's pending record and its commit) comes again, with ``recovering=True``. Then the sink
first asks ``/internal/force_flush`` (so recent samples are searchable) and reads back
``/api/v1/export`` for the range's devices and time span, and sends only the samples the
server lacks (matched by series, millisecond and value, so two readings in one millisecond
are both kept; two readings of one device with the same millisecond and value, one in the
interrupted range and one in an earlier one, are taken for one). If the read-back fails,
the write fails and is retried later: it never sends blind.

Precision: VictoriaMetrics keeps milliseconds, so a reading's nanoseconds are truncated to
the millisecond, and two readings of one device inside one millisecond are two samples with
the same timestamp (a dedup flag on the server would collapse them into one). Values are
stored as decimals of about 15 significant digits (18446744073709551615 comes back as
18446744073709548000); integers beyond int64 are sent as floats. Points older than the
server's retention period are dropped by the server without an error. Durability: a 204
means VictoriaMetrics accepted the points; it buffers the newest ones in memory for about a
second before they reach its disk, so a crash of VictoriaMetrics itself can lose that
second. The embedded SQLite sink is the store of record; this sink feeds dashboards.
"""

from __future__ import annotations

import http.client
import math
import re
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator, Sequence

import orjson

from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import (
    SinkBatch,
    SinkError,
    WriteResult,
    leaf_values,
    take_matching,
)

__all__ = ["VictoriaMetricsSink", "data_fields", "line_for", "numeric_fields"]

_RESERVED_TAGS = ("device_id", "class", "location")
_ESCAPE_TAG = re.compile(r"([,= \\])")
_ESCAPE_MEASUREMENT = re.compile(r"([, \\])")
_TIMEOUT_S = 10.0


def _tag(text: str) -> str:
    # Newlines cannot be escaped in line protocol; a space keeps the line whole.
    return _ESCAPE_TAG.sub(r"\\\1", text.replace("\n", " ").replace("\r", " "))


def _field_value(value: object) -> str | None:
    """The line-protocol value of a number or bool; None when VictoriaMetrics cannot take it."""
    if isinstance(value, bool):
        return "1i" if value else "0i"
    if isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            return f"{value}i"
        # Beyond int64 VictoriaMetrics skips the whole line (answering 204): send a float.
        try:
            return repr(float(value))
        except OverflowError:
            return None
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    return None


def data_fields(data: object, prefix: str = "") -> Iterator[tuple[str, str | None]]:
    """``(field name, line-protocol value or None when not storable)`` for every leaf."""
    return leaf_values(data, _field_value, prefix)


def numeric_fields(data: object, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(field name, line-protocol value)`` for every storable number or bool in ``data``."""
    for name, value in data_fields(data, prefix):
        if value is not None:
            yield name, value


def _tags(reading: StoredReading) -> list[tuple[str, str]]:
    tags = [("device_id", reading.device_id), ("class", reading.device_class),
            ("location", reading.location)]
    tags += [(k, v) for k, v in sorted(reading.labels.items()) if k not in _RESERVED_TAGS]
    return [(k, v) for k, v in tags if k and v]


def _fields(reading: StoredReading) -> tuple[list[tuple[str, str]], int]:
    """The storable fields of a reading, and how many values cannot be stored here."""
    try:
        data = orjson.loads(reading.data)
    except orjson.JSONDecodeError:
        return [], 1
    fields: list[tuple[str, str]] = []
    skipped = 0
    for name, value in data_fields(data):
        if value is None:
            skipped += 1
        else:
            fields.append((name, value))
    return fields, skipped


def line_for(reading: StoredReading, measurement: str,
             fields: Sequence[tuple[str, str]] | None = None) -> str | None:
    """The line-protocol line of one reading (or of ``fields`` of it), or None when it has
    no numeric value."""
    if fields is None:
        fields = _fields(reading)[0]
    if not fields:
        return None
    field_text = ",".join(f"{_tag(name)}={value}" for name, value in fields)
    tag_text = ",".join(f"{_tag(k)}={_tag(v)}" for k, v in _tags(reading))
    return f"{measurement},{tag_text} {field_text} {reading.ts_ns}"


SampleKey = tuple[tuple[tuple[str, str], ...], int]  # (sorted labels with __name__, ts ms)
Stored = dict[SampleKey, list[float]]  # the values the server holds per series and ms
def _number(text: str) -> float:
    """The float of a line-protocol value (``3i``, ``1i`` for true, ``21.5``)."""
    return float(text[:-1] if text.endswith("i") else text)


def sample_key(reading: StoredReading, measurement: str, field: str) -> SampleKey:
    """How VictoriaMetrics names the sample of one field of one reading (labels, ms)."""
    labels = [(k, v.replace("\n", " ").replace("\r", " ")) for k, v in _tags(reading)]
    labels.append(("__name__", f"{measurement}_{field}"))
    return tuple(sorted(labels)), reading.ts_ns // 1_000_000


def _label_value(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class VictoriaMetricsSink:
    kind = "victoriametrics"
    # Read at scrape time by iotpipe.storage.metrics.SinkCollector.
    counter_help = {"skipped_values": "Data values VictoriaMetrics cannot store (strings, "
                                      "nulls, lists, non-finite), not sent"}

    def __init__(self, host: str, port: int, measurement: str = "iotpipe",
                 url: str | None = None) -> None:
        self.host = host
        self.port = port
        self.raw_measurement = measurement
        self.measurement = _ESCAPE_MEASUREMENT.sub(r"\\\1", measurement)
        self.url = url or f"victoriametrics://{host}:{port}"
        self._conn: http.client.HTTPConnection | None = None
        self.counters = dict.fromkeys(self.counter_help, 0)

    @classmethod
    def from_url(cls, url: str) -> VictoriaMetricsSink:
        parsed = urllib.parse.urlsplit(url)
        try:
            port = parsed.port or 8428
        except ValueError:
            raise SinkError(f"sink URL {url!r}: bad port") from None
        if not parsed.hostname:
            raise SinkError(f"sink URL {url!r}: no host (expected victoriametrics://host:8428)")
        options = urllib.parse.parse_qs(parsed.query)
        unknown = set(options) - {"measurement"}
        if unknown:
            raise SinkError(f"sink URL {url!r}: unknown option(s) {sorted(unknown)}")
        measurement = options.get("measurement", ["iotpipe"])[-1]
        if not measurement:
            raise SinkError(f"sink URL {url!r}: empty measurement")
        return cls(parsed.hostname, port, measurement, url=url)

    def _post(self, path: str, body: bytes,
              content_type: str = "text/plain") -> tuple[int, bytes]:
        # One persistent connection; a broken one is replaced once per call.
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=_TIMEOUT_S)
            try:
                self._conn.request("POST", path, body=body,
                                   headers={"Content-Type": content_type})
                response = self._conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise SinkError(f"sink {self.url}: {path}: {exc}") from None
        raise AssertionError("unreachable")

    def stored_samples(self, readings: Sequence[StoredReading]) -> Stored:
        """The values the server holds per (series, ms) for these readings' devices and
        time span (read back with ``/api/v1/export``)."""
        if not readings:
            return {}
        # Best effort: makes the last second's samples searchable (a -forceFlushAuthKey
        # may forbid it; its answer is ignored).
        self._post("/internal/force_flush", b"")
        start_ms = min(r.ts_ns for r in readings) // 1_000_000
        end_ms = max(r.ts_ns for r in readings) // 1_000_000
        name_re = re.escape(self.raw_measurement + "_")
        params: list[tuple[str, str]] = [
            ("match[]", "{__name__=~" + _label_value(name_re + ".*") + ",device_id="
             + _label_value(device) + "}")
            for device in sorted({r.device_id for r in readings})]
        params += [("start", f"{start_ms / 1000:.3f}"), ("end", f"{(end_ms + 1) / 1000:.3f}")]
        status, body = self._post("/api/v1/export", urllib.parse.urlencode(params).encode(),
                                  "application/x-www-form-urlencoded")
        if status != 200:
            raise SinkError(f"sink {self.url}: read-back /api/v1/export answered {status}: "
                            f"{body[:200].decode(errors='replace')}")
        found: Stored = defaultdict(list)
        for line in body.splitlines():
            if not line.strip():
                continue
            try:
                item = orjson.loads(line)
                labels = tuple(sorted(item["metric"].items()))
                for ts_ms, value in zip(item["timestamps"], item["values"], strict=True):
                    found[(labels, int(ts_ms))].append(float(value))
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError,
                    ValueError):
                raise SinkError(f"sink {self.url}: read-back: cannot read export line "
                                f"{line[:120]!r}") from None
        return dict(found)

    def write(self, batches: Sequence[SinkBatch], *, recovering: bool = False) -> WriteResult:
        readings = [reading for batch in batches for reading in batch.readings]
        found = self.stored_samples(readings) if recovering else {}
        lines: list[str] = []
        already = 0
        skipped_values = 0
        for reading in readings:
            fields, skipped = _fields(reading)
            skipped_values += skipped
            if found:
                missing = []
                for name, value in fields:
                    key = sample_key(reading, self.raw_measurement, name)
                    if take_matching(found.get(key), _number(value)):
                        already += 1
                    else:
                        missing.append((name, value))
                fields = missing
            line = line_for(reading, self.measurement, fields)
            if line is not None:
                lines.append(line)
        if skipped_values:
            self.counters["skipped_values"] += skipped_values
        if not lines:
            return WriteResult(0, already)
        status, body = self._post("/write", ("\n".join(lines) + "\n").encode())
        if status not in (200, 204):
            raise SinkError(f"sink {self.url}: /write answered {status}: "
                            f"{body[:200].decode(errors='replace')}")
        return WriteResult(len(lines), already)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
