"""The Akumuli sink without sockets: points, line format, ordering and marks, URL parsing."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.akumuli_standin import WriteParser
from support.storage import T0_NS, log_record

from iotpipe.registry import Registry
from iotpipe.storage.enrich import StoredReading, enrich_records
from iotpipe.storage.sinks import SinkError, open_sink
from iotpipe.storage.sinks.akumuli import DEFAULT_PORT, DEFAULT_QUERY_PORT, AkumuliSink
from iotpipe.storage.sinks.akumuli.client import iso_timestamp, parse_query_answer
from iotpipe.storage.sinks.akumuli.marks import MarksStore
from iotpipe.storage.sinks.akumuli.points import (
    Point,
    format_points,
    plan_write,
    points_for,
    resp_value,
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
    assert [(p.series, p.ts_ns, p.value, p.field) for p in points] == [
        (f"t {tags}", T0_NS, "+21.5", "t"),
        (f"on {tags}", T0_NS, ":1", "on"),
        (f"off {tags}", T0_NS, ":0", "off"),
        (f"n {tags}", T0_NS, "+-3.0", "n"),  # RESP integers are unsigned: a float
        (f"pos_x {tags}", T0_NS, "+1.0", "pos_x"),
        (f"my_field {tags}", T0_NS, ":2", "my field"),
    ]
    assert {p.reading.msg_id for p in points if p.reading is not None} == {"m1"}
    assert skipped == 3  # the string, the null and the list


@pytest.mark.unit
@pytest.mark.parametrize(("value", "line"), [
    (0, ":0"), (36, ":36"), ((1 << 64) - 1, ":18446744073709551615"),  # unsigned: as is
    (-36, "+-36.0"), (-(1 << 53), f"+{-float(1 << 53)!r}"),  # negative: exact float
    (-(1 << 63), f"+{float(-(1 << 63))!r}"),  # beyond 2**53: nearest float64 (documented)
    (True, ":1"), (2.5, "+2.5"), (-0.5, "+-0.5"),
    (float("nan"), None), (float("inf"), None), ("x", None), (None, None), ([1], None),
])
def test_every_value_is_sent_in_a_form_akumuli_accepts(value: object, line: str | None
                                                       ) -> None:
    assert resp_value(value) == line
    if line is not None:  # and the stand-in (which refuses what Akumuli refuses) takes it
        parsed = WriteParser().feed(f"+t device=a\r\n:1\r\n{line}\r\n".encode())
        assert parsed[0].value == float(value)  # type: ignore[arg-type]


@pytest.mark.unit
def test_unknown_device_and_negative_int() -> None:
    points, skipped = points_for(_reading(b'{"rssi":-36}', device="d 9"))
    assert [(p.series, p.value) for p in points] == [
        ("rssi class=unknown device=d_9 location=unknown", "+-36.0")]
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
def test_plan_orders_each_series_and_keeps_late_points_apart() -> None:
    a, b = "t device=a", "t device=b"
    points = [Point(a, 30, ":3"), Point(b, 5, ":5"), Point(a, 10, ":1"), Point(a, 20, ":2"),
              Point(b, 3, ":4"), Point(a, 20, ":9"), Point(b, 4, ":6")]
    plan = plan_write(points, {b: 4})
    # a@20 twice: Akumuli stores an equal timestamp again, and both are readings of their own.
    assert plan.send == [Point(a, 10, ":1"), Point(a, 20, ":2"), Point(a, 20, ":9"),
                         Point(a, 30, ":3"), Point(b, 4, ":6"), Point(b, 5, ":5")]
    assert plan.late == [Point(b, 3, ":4")]  # older than b's mark: never sent
    assert plan.held == 0
    assert plan.new_marks == {a: 30, b: 5}


@pytest.mark.unit
def test_plan_sends_only_what_the_server_does_not_hold() -> None:
    a = "t device=a"
    points = [Point(a, 10, ":1"), Point(a, 20, ":2"), Point(a, 20, ":9"), Point(a, 30, ":3")]
    # A send was cut after a@10 and the first a@20: the server holds those two.
    plan = plan_write(points, {a: 20}, {(a, 10): [1.0], (a, 20): [2.0]})
    assert plan.send == [Point(a, 20, ":9"), Point(a, 30, ":3")]
    assert plan.held == 2 and plan.late == []
    # Everything held: nothing to send, nothing late.
    done = plan_write(points, {a: 30}, {(a, 10): [1.0], (a, 20): [9.0, 2.0], (a, 30): [3.0]})
    assert done.send == [] and done.late == [] and done.held == 4
    # Same series and timestamp but another value: another reading, not held.
    other = plan_write([Point(a, 40, "+4.5")], {a: 30}, {(a, 40): [4.0]})
    assert other.send == [Point(a, 40, "+4.5")] and other.held == 0


@pytest.mark.unit
def test_query_answers_in_the_real_server_formats() -> None:
    text = ("temp device=y class=x,ts=1796035254006683000,21.5\n"
            "temp class=x device=y,ts=1796035254006683001,-36\n")
    assert parse_query_answer(text) == [("temp class=x device=y", 1796035254006683000, 21.5),
                                        ("temp class=x device=y", 1796035254006683001, -36.0)]
    assert parse_query_answer("-not found\r\n") == []  # no series matched: nothing stored
    assert parse_query_answer("") == []
    with pytest.raises(ValueError, match="query parsing error"):
        parse_query_answer("-query parsing error: bad range\r\n")
    with pytest.raises(ValueError, match="cannot read row"):
        parse_query_answer("temp class=x,2025-11-26T10:00:00,1\n")


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
    client = sink.client
    assert (client.host, client.port, client.query_port, client.confirm_s) == (
        "tsdb.local", DEFAULT_PORT, 9999, 0.02)
    assert sink.kind == "akumuli"
    sink.close()
    assert marks.exists()


@pytest.mark.unit
def test_default_marks_file_is_in_the_storage_data_dir(tmp_path: Path) -> None:
    sink = open_sink("akumuli://akumuli.tsdb:8282/",  # the operator's URL shape
                     state_dir=tmp_path / "store")
    assert isinstance(sink, AkumuliSink)
    assert sink.client.query_port == DEFAULT_QUERY_PORT
    sink.close()
    assert (tmp_path / "store" / "akumuli-akumuli.tsdb-8282.marks.db").exists()


@pytest.mark.unit
def test_without_a_marks_file_or_data_dir_the_sink_names_both_ways_to_give_one() -> None:
    with pytest.raises(SinkError, match=r"no marks file: give \?marks=.*--data-dir"):
        AkumuliSink.from_url("akumuli://akumuli.tsdb:8282/")


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
