"""Readings as Akumuli points, and which of them to send: plain functions, no I/O.

Points. Each numeric value of a reading's data object becomes one point: metric = the field
name (nested objects flattened with ``_``, sanitised to ``[A-Za-z0-9_./-]``), tags
``device=<id> class=<class> location=<location>`` plus the registry labels (a label named like
one of those three is dropped; tag values have Akumuli's forbidden characters - space, ``:``,
``=``, ``|`` - and ``,`` replaced by ``_``; empty values are left out), timestamp = the
reading's ``ts_ns``, always sent as ``:<nanoseconds>`` (Akumuli stores a timestamp string it
cannot parse as epoch 0, silently).

Values. Akumuli's RESP integers are unsigned (``:-36`` is refused with ``-PARSER can't parse
integer``) and every value is stored as a float64. So booleans are ``:0``/``:1``, integers
in ``[0, 2**64)`` ``:<int>``, and negative integers (and larger ones) ``+<float>``: exact for
``|v| <= 2**53``, rounded to the nearest float64 beyond that (as Akumuli would store them
anyway). Floats are ``+<repr>``. Strings, nulls, lists and non-finite floats are skipped and
counted.

Order and late points. Akumuli refuses a point older than its series' newest point
(``-DB late write``) and stores an equal timestamp again. ``plan_write`` sorts each write per
series by timestamp against a per-series high-water mark (the newest timestamp known to be
held): a point older than its mark is late and never sent (it would close the connection);
a point with the mark's own timestamp is sent (another reading). Points the server already
holds (read back after an uncertain send) are not sent again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import orjson

from iotpipe.storage.enrich import StoredReading
from iotpipe.storage.sinks import leaf_values, take_matching

__all__ = [
    "Held",
    "Plan",
    "Point",
    "format_points",
    "plan_write",
    "point_number",
    "points_for",
    "resp_value",
    "sanitise_name",
    "series_name",
]

_UINT64_END = 1 << 64
_BAD_NAME = re.compile(r"[^A-Za-z0-9_./-]")
# Akumuli forbids space, ':', '=' and '|' in names and values; ',' would break CSV answers.
_BAD_VALUE = re.compile(r"[\s:=|,]")


class Point(NamedTuple):
    series: str  # canonical series name: metric, then tags sorted by name
    ts_ns: int
    value: str  # the RESP value line without CRLF: ``+21.5`` or ``:1``
    field: str = ""  # the data field it came from
    reading: StoredReading | None = None


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


def resp_value(value: object) -> str | None:
    """The RESP value line (without CRLF) Akumuli accepts for ``value``; None: not numeric."""
    if isinstance(value, bool):
        return ":1" if value else ":0"
    if isinstance(value, int):
        if 0 <= value < _UINT64_END:
            return f":{value}"  # RESP integers are unsigned
        try:
            return f"+{float(value)!r}"  # negative: a float, exact up to 2**53
        except OverflowError:
            return None
    if isinstance(value, float):
        return f"+{value!r}" if math.isfinite(value) else None
    return None


def points_for(reading: StoredReading) -> tuple[list[Point], int]:
    """The points of one reading, and how many values were skipped as not numeric."""
    try:
        data = orjson.loads(reading.data)
    except orjson.JSONDecodeError:
        return [], 1
    points: list[Point] = []
    skipped = 0
    tags = reading_tags(reading)
    for field_name, value in leaf_values(data, resp_value):
        if value is None:
            skipped += 1
            continue
        points.append(Point(series_name(sanitise_name(field_name), tags), reading.ts_ns, value,
                            field_name, reading))
    return points, skipped


def format_points(points: Sequence[Point]) -> bytes:
    return "".join(f"+{p.series}\r\n:{p.ts_ns}\r\n{p.value}\r\n" for p in points).encode()


class Plan(NamedTuple):
    send: list[Point]  # sorted by series, then timestamp (stable)
    late: list[Point]  # older than their series' mark: never sent
    held: int  # points the server already holds (read back), not sent again
    new_marks: dict[str, int]  # series -> newest timestamp sent


Held = dict[tuple[str, int], list[float]]  # (series, ts) -> values the server holds there

def point_number(point: Point) -> float:
    return float(point.value[1:])


def plan_write(points: Sequence[Point], marks: Mapping[str, int],
               held: Held | None = None) -> Plan:
    """What to send: each series in timestamp order; nothing older than its mark (late);
    nothing the server already holds (``held``: values per (series, ts), read back)."""
    remaining = {key: list(values) for key, values in (held or {}).items()}
    send: list[Point] = []
    late: list[Point] = []
    already = 0
    new_marks: dict[str, int] = {}
    for point in sorted(points, key=lambda p: (p.series, p.ts_ns)):
        if take_matching(remaining.get((point.series, point.ts_ns)), point_number(point)):
            already += 1
            continue
        mark = new_marks.get(point.series, marks.get(point.series))
        if mark is not None and point.ts_ns < mark:
            late.append(point)
            continue
        new_marks[point.series] = point.ts_ns
        send.append(point)
    return Plan(send, late, already, new_marks)
