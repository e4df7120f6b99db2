"""The VictoriaMetrics sink: line protocol, and a real victoria-metrics on loopback."""

from __future__ import annotations

import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from support.ports import free_port
from support.processes import ProcessGroup
from support.storage import (
    T0_NS,
    FakeFeed,
    db_rows,
    log_record,
    make_log,
    start_storage,
    start_victoria_metrics,
)
from support.waiting import wait_for

from iotpipe.registry import Registry
from iotpipe.storage.enrich import StoredReading, enrich_records
from iotpipe.storage.sinks import SinkBatch, SinkError, WriteResult, open_sink
from iotpipe.storage.sinks.victoriametrics import VictoriaMetricsSink, data_fields, line_for

REGISTRY = Registry.from_yaml(
    "devices: {therm-1: {class: thermostat, location: 'lab 2', labels: {floor: 3, class: x}}}")


def _reading(data: bytes, device: str = "therm-1", msg_id: str = "m1") -> StoredReading:
    stored, rejected = enrich_records(1, [log_record(device, msg_id, T0_NS, data)], REGISTRY)
    assert rejected == []
    return stored[0]


@pytest.mark.unit
def test_line_protocol_tags_fields_and_escaping() -> None:
    line = line_for(_reading(b'{"t":21.5,"on":true,"n":3,"s":"text","pos":{"x":1.0},"z":null}'),
                    "iotpipe")
    assert line == (
        "iotpipe,device_id=therm-1,class=thermostat,location=lab\\ 2,floor=3 "
        f"t=21.5,on=1i,n=3i,pos_x=1.0 {T0_NS}"
    )
    assert line_for(_reading(b'{"s":"only text"}'), "iotpipe") is None
    line = line_for(_reading(b'{"a,b=c":1}', device="odd,dev=1 x"), "m")
    assert line == ("m,device_id=odd\\,dev\\=1\\ x,class=unknown,location=unknown "
                    f"a\\,b\\=c=1i {T0_NS}")


@pytest.mark.unit
def test_values_victoriametrics_cannot_take_are_sent_as_floats_or_counted() -> None:
    big = (1 << 64) - 1
    line = line_for(_reading(b'{"big":%d,"n":-36,"s":"x","z":null,"l":[1]}' % big), "m")
    assert line is not None and f" big={float(big)!r},n=-36i {T0_NS}" in line
    assert list(data_fields({"s": "x", "z": None, "l": [1], "f": 1.5})) == [
        ("s", None), ("z", None), ("l", None), ("f", "1.5")]


@pytest.mark.unit
def test_url_errors_name_the_url() -> None:
    with pytest.raises(SinkError, match="no host"):
        open_sink("victoriametrics://")
    with pytest.raises(SinkError, match=r"unknown option\(s\) \['db'\]"):
        open_sink("victoriametrics://h:8428?db=x")
    sink = open_sink("victoriametrics://vm.example:9999?measurement=plant")
    assert isinstance(sink, VictoriaMetricsSink)
    assert (sink.host, sink.port, sink.measurement) == ("vm.example", 9999, "plant")


@pytest.mark.unit
def test_unreachable_server_is_a_sink_error() -> None:
    sink = VictoriaMetricsSink("127.0.0.1", free_port())
    with pytest.raises(SinkError, match=r"victoriametrics://127\.0\.0\.1"):
        sink.write([SinkBatch("m", 1, [_reading(b'{"t":1}')])])


@pytest.fixture
def victoria(procs: ProcessGroup, tmp_path: Path) -> Iterator[int]:
    yield start_victoria_metrics(procs, tmp_path / "vm")


def export(port: int, selector: str) -> list[dict[str, object]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/internal/force_flush", timeout=10):
        pass
    body = urllib.parse.urlencode({"match[]": selector, "start": "0"}).encode()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/export", body,
                                timeout=10) as resp:
        return [orjson.loads(line) for line in resp.read().splitlines() if line.strip()]


@pytest.mark.integration
def test_real_victoriametrics_recovery_writes_only_missing_samples(victoria: int) -> None:
    records = [log_record("therm-1", f"m{i}", T0_NS + i * 1_000_000_000,
                          b'{"t":%d.5,"label":"x"}' % i) for i in range(10)]
    # Two readings 0.4 ms apart: one millisecond in VictoriaMetrics, yet two samples.
    records.append(log_record("therm-1", "m-twin", T0_NS + 9 * 1_000_000_000 + 400_000,
                              b'{"t":99.5}'))
    readings, _ = enrich_records(1, records, REGISTRY)
    sink = open_sink(f"victoriametrics://127.0.0.1:{victoria}")
    # A write cut short: only the first 6 readings reached the server.
    assert sink.write([SinkBatch("store", 1, readings[:6])]) == WriteResult(6, 0)
    # The range comes again after a crash: only what the server lacks is sent.
    assert sink.write([SinkBatch("store", 1, readings)], recovering=True) == WriteResult(5, 6)
    # And once more (a second crash): nothing is sent at all.
    assert sink.write([SinkBatch("store", 1, readings)], recovering=True) == WriteResult(0, 11)
    sink.close()
    series = export(victoria, '{__name__="iotpipe_t"}')
    assert len(series) == 1
    assert series[0]["metric"] == {"__name__": "iotpipe_t", "device_id": "therm-1",
                                   "class": "thermostat", "location": "lab 2", "floor": "3"}
    assert sorted(series[0]["values"]) == sorted([i + 0.5 for i in range(10)] + [99.5])
    ms = [(T0_NS + i * 1_000_000_000) // 1_000_000 for i in range(10)]
    assert sorted(series[0]["timestamps"]) == sorted([*ms, ms[9]])  # type: ignore[type-var]


@pytest.mark.integration
def test_real_victoriametrics_takes_huge_integers_and_counts_skipped_values(
        victoria: int) -> None:
    from prometheus_client import CollectorRegistry

    from iotpipe.storage.metrics import StorageMetrics

    registry = CollectorRegistry()
    sink = open_sink(f"victoriametrics://127.0.0.1:{victoria}")
    StorageMetrics(registry).watch_sinks([sink])
    reading = _reading(b'{"big":18446744073709551615,"ok":1,"s":"text"}')
    assert sink.write([SinkBatch("store", 1, [reading])]) == WriteResult(1, 0)
    sink.close()
    assert registry.get_sample_value("iotpipe_storage_victoriametrics_skipped_values_total",
                                     {"sink": "victoriametrics"}) == 1  # the string
    # VictoriaMetrics would have skipped the whole line for an int64 overflow (still 204).
    values = {s["metric"]["__name__"]: s["values"]  # type: ignore[index]
              for s in export(victoria, '{__name__=~"iotpipe_(big|ok)"}')}
    assert values["iotpipe_ok"] == [1]
    # Stored as a decimal of about 15 significant digits (18446744073709548000 here).
    assert values["iotpipe_big"] == [pytest.approx(18446744073709551615, rel=1e-14)]


@pytest.mark.integration
def test_storage_process_writes_sqlite_and_victoriametrics(
    victoria: int, procs: ProcessGroup, tmp_path: Path
) -> None:

    feed = FakeFeed(f"tcp://127.0.0.1:{free_port()}", make_log(300, prefix="a-dev-")).start()
    try:
        proc, _ = start_storage(
            procs, tmp_path, [feed.endpoint], "storage",
            sinks=[f"sqlite://{tmp_path}/store/readings.db",
                   f"victoriametrics://127.0.0.1:{victoria}"])
        wait_for(lambda: feed.acked_count() == 300, 20, "every record acknowledged")
        # VictoriaMetrics tails the store of record: it catches up after the acks.
        wait_for(lambda: sum(len(s["values"]) for s in export(  # type: ignore[misc, arg-type]
            victoria, '{__name__="iotpipe_i"}')) == 300, 20, "VictoriaMetrics caught up")
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        feed.stop()
    series = export(victoria, '{__name__="iotpipe_i"}')
    assert sorted(len(s["values"]) for s in series) == [60] * 5  # type: ignore[arg-type]
    boiler = next(s for s in series if s["metric"]["device_id"] == "a-dev-1")  # type: ignore[index]
    assert boiler["metric"]["class"] == "boiler"  # type: ignore[index]
    rows = db_rows(tmp_path)
    assert len(rows) == 300
