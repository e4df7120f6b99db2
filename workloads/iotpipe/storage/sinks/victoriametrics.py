"""VictoriaMetrics sink: Influx line protocol POSTed to ``/write``.

URL: ``victoriametrics://host:8428`` (plain HTTP; ``?measurement=NAME`` changes the
measurement, default ``iotpipe``). Each reading becomes one line::

    iotpipe,device_id=therm-1,class=thermostat,location=lab,floor=3 t=21.5,on=1i <ts_ns>

Tags are ``device_id``, ``class``, ``location`` and the registry labels (a label named like
one of the first three is dropped). Fields are the numeric and boolean values of the
reading's data object; nested objects are flattened with ``_`` (``{"a": {"b": 1}}`` ->
``a_b``); strings, lists and nulls are skipped, since VictoriaMetrics stores numbers only.
A reading without a numeric value writes nothing here (it is still in the other sinks).
VictoriaMetrics names the series ``<measurement>_<field>``.

Idempotency: a redelivered reading is the same sample (series, timestamp, value) again.
Run VictoriaMetrics with ``-dedup.minScrapeInterval=1ms`` so such repeats collapse to one;
without it, repeats are kept as duplicate samples. Durability: a 204 means VictoriaMetrics
accepted the points; it buffers the newest ones in memory for about a second before they
reach its disk, so a crash of VictoriaMetrics itself can lose that second. The embedded
SQLite sink is the store of record; this sink feeds dashboards.
"""

from __future__ import annotations

import http.client
import math
import re
import urllib.parse
from collections.abc import Iterator, Sequence

import orjson

from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import SinkBatch, SinkError, WriteResult

__all__ = ["VictoriaMetricsSink", "line_for", "numeric_fields"]

_RESERVED_TAGS = ("device_id", "class", "location")
_ESCAPE_TAG = re.compile(r"([,= \\])")
_ESCAPE_MEASUREMENT = re.compile(r"([, \\])")
_TIMEOUT_S = 10.0


def _tag(text: str) -> str:
    # Newlines cannot be escaped in line protocol; a space keeps the line whole.
    return _ESCAPE_TAG.sub(r"\\\1", text.replace("\n", " ").replace("\r", " "))


def numeric_fields(data: object, prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(field name, line-protocol value)`` for every number or bool in ``data``."""
    if not isinstance(data, dict):
        return
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            yield name, "1i" if value else "0i"
        elif isinstance(value, int):
            yield name, f"{value}i"
        elif isinstance(value, float):
            if math.isfinite(value):
                yield name, repr(value)
        elif isinstance(value, dict):
            yield from numeric_fields(value, f"{name}_")


def line_for(reading: StoredReading, measurement: str) -> str | None:
    """The line-protocol line of one reading, or None when it has no numeric value."""
    try:
        data = orjson.loads(reading.data)
    except orjson.JSONDecodeError:
        return None
    fields = ",".join(f"{_tag(name)}={value}" for name, value in numeric_fields(data))
    if not fields:
        return None
    tags = [("device_id", reading.device_id), ("class", reading.device_class),
            ("location", reading.location)]
    tags += [(k, v) for k, v in sorted(reading.labels.items()) if k not in _RESERVED_TAGS]
    tag_text = ",".join(f"{_tag(k)}={_tag(v)}" for k, v in tags if k and v)
    return f"{measurement},{tag_text} {fields} {reading.ts_ns}"


class VictoriaMetricsSink:
    kind = "victoriametrics"

    def __init__(self, host: str, port: int, measurement: str = "iotpipe",
                 url: str | None = None) -> None:
        self.host = host
        self.port = port
        self.measurement = _ESCAPE_MEASUREMENT.sub(r"\\\1", measurement)
        self.url = url or f"victoriametrics://{host}:{port}"
        self._conn: http.client.HTTPConnection | None = None

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

    def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        # One persistent connection; a broken one is replaced once per call.
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=_TIMEOUT_S)
            try:
                self._conn.request("POST", path, body=body,
                                   headers={"Content-Type": "text/plain"})
                response = self._conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                self._conn = None
                if attempt == 2:
                    raise SinkError(f"sink {self.url}: {path}: {exc}") from None
        raise AssertionError("unreachable")

    def write(self, batches: Sequence[SinkBatch]) -> WriteResult:
        lines = [line for batch in batches for reading in batch.readings
                 if (line := line_for(reading, self.measurement)) is not None]
        if not lines:
            return WriteResult(0, 0)
        status, body = self._post("/write", ("\n".join(lines) + "\n").encode())
        if status not in (200, 204):
            raise SinkError(f"sink {self.url}: /write answered {status}: "
                            f"{body[:200].decode(errors='replace')}")
        return WriteResult(len(lines), 0)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
