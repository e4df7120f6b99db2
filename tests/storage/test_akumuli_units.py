"""The Akumuli sink without sockets: points, line format, ordering and marks, URL parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
from akumuli_standin import WriteParser
from storage_helpers import T0_NS, log_record

from iotpipe.registry import Registry
from iotpipe.storage.enrich import StoredReading, enrich_records
from iotpipe.storage.sinks import SinkError, open_sink
from iotpipe.storage.sinks.akumuli import (
    DEFAULT_PORT,
    DEFAULT_QUERY_PORT,
    AkumuliSink,
    MarksStore,
    Point,
    format_points,
    iso_timestamp,
    plan_write,
    points_for,
)

REGISTRY = Registry.from_yaml(
    "devices: {therm-1: {class: thermostat, location: 'lab 2', "
    "labels: {floor: 3, class: x, 'zone:a': 'n=1|b'}}}")


def _reading(data: bytes, device: str = "therm-1", ts: int = T0_NS) -> StoredReading:
    stored, rejected = enrich_records(1, [log_record(device, "m1", ts, data)], REGISTRY)
    assert rejected == []
    return stored[0]


@pytest.mark.unit
def test_one_point_per_numeric_field_with_tags() -> None:
    points, skipped = points_for(_reading(
        b'{"t":21.5,"on":true,"off":false,"n":-3,"s":"text","z":null,"l":[1],'
        b'"pos":{"x":1.0},"my field":2}'))
    tags = "class=thermostat device=therm-1 floor=3 location=lab_2 zone_a=n_1_b"
    assert points == [
        Point(f"t {tags}", T0_NS, "+21.5"),
        Point(f"on {tags}", T0_NS, ":1"),
        Point(f"off {tags}", T0_NS, ":0"),
        Point(f"n {tags}", T0_NS, ":-3"),
        Point(f"pos_x {tags}", T0_NS, "+1.0"),
        Point(f"my_field {tags}", T0_NS, ":2"),
    ]
    assert skipped == 3  # the string, the null and the list


@pytest.mark.unit
def test_unknown_device_and_int_beyond_int64() -> None:
    big = (1 << 64) - 1  # orjson's largest integer; Akumuli's ":" form is 64-bit signed
    points, skipped = points_for(_reading(b'{"big":%d}' % big, device="d 9"))
    assert points == [Point("big class=unknown device=d_9 location=unknown", T0_NS,
                            f"+{float(big)!r}")]
    assert skipped == 0


@pytest.mark.unit
def test_format_is_what_akumuli_parses() -> None:
    points, _ = points_for(_reading(b'{"t":21.5,"on":true}'))
    payload = format_points(points)
    assert payload.startswith(b"+t class=thermostat device=therm-1 ")
    assert f"\r\n:{T0_NS}\r\n+21.5\r\n".encode() in payload  # nanosecond form only
    parsed = WriteParser().feed(payload)
    assert [(p.series, p.ts_ns, p.value) for p in parsed] == [
        (points[0].series, T0_NS, 21.5), (points[1].series, T0_NS, 1.0)]


@pytest.mark.unit
def test_plan_orders_each_series_and_skips_at_or_below_mark() -> None:
    a, b = "t device=a", "t device=b"
    points = [Point(a, 30, ":3"), Point(b, 5, ":5"), Point(a, 10, ":1"), Point(a, 20, ":2"),
              Point(b, 4, ":4"), Point(a, 20, ":9")]
    plan = plan_write(points, {b: 4})
    assert plan.send == [Point(a, 10, ":1"), Point(a, 20, ":2"), Point(a, 30, ":3"),
                         Point(b, 5, ":5")]
    assert plan.late == 2  # b@4 is at its mark; the second a@20 repeats a timestamp
    assert plan.new_marks == {a: 30, b: 5}
    assert plan.first_ts == {a: 10, b: 5}
    # the same points again (a redelivery) send nothing
    again = plan_write(points, plan.new_marks)
    assert again.send == [] and again.late == len(points)


@pytest.mark.unit
def test_iso_timestamp() -> None:
    assert iso_timestamp(T0_NS + 7) == "20251126T100000.000000007"


@pytest.mark.unit
def test_marks_store_survives_reopen_and_forgets(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = MarksStore(path, "akumuli://x")
    store.save({"t device=a": 5, "t device=b": 7})
    store.save({"t device=a": 9}, forget=["t device=b"])
    store.close()
    reopened = MarksStore(path, "akumuli://x")
    assert reopened.load() == {"t device=a": 9}
    reopened.close()


@pytest.mark.unit
def test_url_parsing_and_open_sink(tmp_path: Path) -> None:
    marks = tmp_path / "marks.db"
    sink = open_sink(f"akumuli://tsdb.local?marks={marks}&query_port=9999&confirm_ms=20")
    assert isinstance(sink, AkumuliSink)
    assert (sink.host, sink.port, sink.query_port, sink.confirm_s) == (
        "tsdb.local", DEFAULT_PORT, 9999, 0.02)
    assert sink.kind == "akumuli"
    sink.close()
    assert marks.exists()


@pytest.mark.unit
def test_default_marks_file_is_in_the_storage_data_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTPIPE_STORAGE_DATA_DIR", str(tmp_path / "store"))
    sink = AkumuliSink.from_url("akumuli://akumuli.tsdb:8282/")  # the operator's URL shape
    assert sink.query_port == DEFAULT_QUERY_PORT
    sink.close()
    assert (tmp_path / "store" / "akumuli-akumuli.tsdb-8282.marks.db").exists()


@pytest.mark.unit
@pytest.mark.parametrize(("url", "needle"), [
    ("akumuli://", "no host"),
    ("akumuli://h:99999", "bad port"),
    ("akumuli://h/db", "unexpected path"),
    ("akumuli://h?retention=1", "unknown option"),
    ("akumuli://h?query_port=x", "must be numbers"),
    ("akumuli://h?confirm_ms=0", "confirm_ms"),
    ("akumuli://h?marks=", "empty marks path"),
])
def test_bad_urls_name_the_problem(url: str, needle: str) -> None:
    with pytest.raises(SinkError, match=needle) as caught:
        AkumuliSink.from_url(url)
    assert url in str(caught.value)


@pytest.mark.unit
def test_unwritable_marks_location_names_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SinkError, match="cannot open marks file"):
        AkumuliSink.from_url(f"akumuli://h?marks={blocker}/sub/m.db")
