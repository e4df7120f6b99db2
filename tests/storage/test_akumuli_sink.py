"""The Akumuli sink against the protocol-faithful stand-in, on loopback."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support.akumuli_standin import AkumuliStandin
from support.ports import free_port
from support.storage import T0_NS, log_record

from iotpipe.registry import Registry
from iotpipe.storage.enrich import StoredReading, enrich_records
from iotpipe.storage.metrics import SinkCollector
from iotpipe.storage.sinks import SinkBatch, SinkError, WriteResult
from iotpipe.storage.sinks.akumuli import AkumuliSink
from iotpipe.storage.sinks.akumuli.points import Point

REGISTRY_YAML = Registry.from_yaml(
    "devices: {d1: {class: thermostat, location: lab}, d2: {class: meter, location: hall}}")
S = 1_000_000_000
D1_T = "t class=thermostat device=d1 location=lab"
D1_ON = "on class=thermostat device=d1 location=lab"
D2_T = "t class=meter device=d2 location=hall"


def _readings(*items: tuple[str, int, bytes]) -> list[StoredReading]:
    records = [log_record(device, f"m-{device}-{ts}", ts, data, node_seq=i)
               for i, (device, ts, data) in enumerate(items, 1)]
    stored, rejected = enrich_records(1, records, REGISTRY_YAML)
    assert rejected == []
    return stored


def _batch(*items: tuple[str, int, bytes], first: int = 1) -> list[SinkBatch]:
    return [SinkBatch("middle-0", first, _readings(*items))]


def _t(device: str, offset_s: int, value: float) -> tuple[str, int, bytes]:
    return device, T0_NS + offset_s * S, b'{"t":%r}' % value


@pytest.fixture
def standin() -> Iterator[AkumuliStandin]:
    with AkumuliStandin() as server:
        yield server


def _sink(standin: AkumuliStandin, marks: Path, confirm_ms: int = 50) -> AkumuliSink:
    return AkumuliSink.from_url(
        f"akumuli://{standin.host}:{standin.port}?query_port={standin.query_port}"
        f"&marks={marks}&confirm_ms={confirm_ms}")


@pytest.fixture
def sink(standin: AkumuliStandin, tmp_path: Path) -> Iterator[AkumuliSink]:
    opened = _sink(standin, tmp_path / "marks.db")
    try:
        yield opened
    finally:
        opened.close()


def _counter(sink: AkumuliSink, name: str) -> float:
    """A sink counter as storage's /metrics shows it."""
    registry = CollectorRegistry()
    registry.register(SinkCollector([sink]))
    return registry.get_sample_value(f"iotpipe_storage_akumuli_{name}_total",
                                     {"sink": "akumuli"}) or 0.0


@pytest.mark.integration
def test_writes_are_stored_one_point_per_numeric_field(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    skipped_before = _counter(sink, "skipped_values")
    result = sink.write(_batch(("d1", T0_NS, b'{"t":21.5,"on":true,"name":"x"}'),
                               _t("d2", 0, 3.0), _t("d1", 1, 22.0)))
    assert result == WriteResult(4, 0)
    assert standin.series() == {
        D1_T: [(T0_NS, 21.5), (T0_NS + S, 22.0)],
        D1_ON: [(T0_NS, 1.0)],
        D2_T: [(T0_NS, 3.0)],
    }
    assert standin.errors_sent == []
    assert _counter(sink, "skipped_values") == skipped_before + 1  # the string


@pytest.mark.integration
def test_negative_and_large_integers_are_stored(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    result = sink.write(_batch(("d1", T0_NS, b'{"rssi":-36}'),
                               ("d1", T0_NS + S, b'{"rssi":18446744073709551615}')))
    assert result == WriteResult(2, 0)
    assert standin.errors_sent == []  # ":-36" would be refused by Akumuli
    assert standin.series() == {"rssi class=thermostat device=d1 location=lab": [
        (T0_NS, -36.0), (T0_NS + S, float(18446744073709551615))]}


@pytest.mark.integration
def test_recovering_write_stores_nothing_twice(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    batch = _batch(_t("d1", 0, 1.0), _t("d1", 1, 2.0), _t("d2", 0, 3.0))
    assert sink.write(batch) == WriteResult(3, 0)
    before = standin.series()
    # Akumuli would store the equal timestamps again: a range written again after a crash
    # is read back first, and nothing it holds is sent.
    assert sink.write(batch, recovering=True) == WriteResult(0, 3)
    assert standin.series() == before
    assert standin.connections == 1


@pytest.mark.integration
def test_equal_timestamps_of_two_readings_are_both_stored(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    both = [*_readings(_t("d1", 0, 1.0)), *_readings(("d1", T0_NS, b'{"t":2.0}'))]
    both[1] = both[1]._replace(msg_id="other")
    assert sink.write([SinkBatch("store", 1, both)]) == WriteResult(2, 0)
    assert standin.series() == {D1_T: [(T0_NS, 1.0), (T0_NS, 2.0)]}
    # and a recovery of that range counts both as held
    assert sink.write([SinkBatch("store", 1, both)], recovering=True) == WriteResult(0, 2)


@pytest.mark.integration
def test_out_of_order_batch_is_stored_in_order(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    result = sink.write(_batch(_t("d1", 3, 3.0), _t("d1", 1, 1.0), _t("d2", 5, 5.0),
                               _t("d1", 2, 2.0), _t("d2", 4, 4.0)))
    assert result == WriteResult(5, 0)
    assert standin.errors_sent == []  # no late-write refusal
    assert standin.series() == {
        D1_T: [(T0_NS + S, 1.0), (T0_NS + 2 * S, 2.0), (T0_NS + 3 * S, 3.0)],
        D2_T: [(T0_NS + 4 * S, 4.0), (T0_NS + 5 * S, 5.0)],
    }


@pytest.mark.integration
def test_late_points_are_returned_not_sent_and_not_counted_as_duplicates(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    sink.write(_batch(_t("d1", 10, 10.0)))
    result = sink.write(_batch(_t("d1", 5, 5.0), _t("d1", 20, 20.0), _t("d2", 1, 1.0)))
    assert (result.written, result.duplicates) == (2, 0)
    assert [(p.reading.device_id, p.reading.ts_ns, p.field, p.value) for p in result.late] == [
        ("d1", T0_NS + 5 * S, "t", "5.0")]
    assert "late" in result.late[0].reason
    assert standin.errors_sent == []
    assert standin.series() == {D1_T: [(T0_NS + 10 * S, 10.0), (T0_NS + 20 * S, 20.0)],
                                D2_T: [(T0_NS + S, 1.0)]}


@pytest.mark.integration
def test_error_line_mid_send_is_read_back_and_completed_exactly(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    batch = _batch(*[_t("d1", i, float(i)) for i in range(5)])
    standin.fail_next("DB internal error", after_points=2)
    reconciles_before = _counter(sink, "reconciles")
    # The server stores 2 points, refuses the 3rd, closes and drops the rest of the send:
    # the sink reads back what it holds and sends only the missing points.
    assert sink.write(batch) == WriteResult(3, 2)
    assert _counter(sink, "reconciles") == reconciles_before + 1
    assert standin.series() == {D1_T: [(T0_NS + i * S, float(i)) for i in range(5)]}
    assert standin.errors_sent == ["DB internal error"]
    assert standin.connections == 2


@pytest.mark.integration
def test_repeated_errors_fail_the_write_naming_the_url(
        sink: AkumuliSink, standin: AkumuliStandin, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch(*[_t("d1", i, float(i)) for i in range(3)])
    original = standin.store.accept

    def refuse_each_send(point: object) -> tuple[str, float] | None:
        standin.fail_next("DB disk full", after_points=0)
        return original(point)  # type: ignore[arg-type]

    monkeypatch.setattr(standin.store, "accept", refuse_each_send)
    with pytest.raises(SinkError, match="DB disk full") as caught:
        sink.write(batch)
    assert sink.url in str(caught.value)
    assert standin.errors_sent == ["DB disk full"] * 3  # three rounds, then the tier retries
    monkeypatch.undo()
    assert sink.write(batch, recovering=True) == WriteResult(3, 0)
    assert standin.series() == {D1_T: [(T0_NS + i * S, float(i)) for i in range(3)]}


@pytest.mark.integration
def test_server_late_write_is_resolved_without_wedging(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    # Another writer (or a lost marks file) put a newer d1 point on the server.
    with socket.create_connection((standin.host, standin.port), timeout=5) as other:
        other.sendall(f"+{D1_T}\r\n:{T0_NS + 100 * S}\r\n+100.0\r\n".encode())
    deadline = time.monotonic() + 5
    while not standin.series() and time.monotonic() < deadline:
        time.sleep(0.01)
    result = sink.write(_batch(_t("d2", 1, 1.0), _t("d1", 50, 50.0), _t("d1", 150, 150.0)))
    assert standin.errors_sent == ["DB late write"]
    assert standin.series() == {
        D1_T: [(T0_NS + 100 * S, 100.0), (T0_NS + 150 * S, 150.0)],
        D2_T: [(T0_NS + S, 1.0)],
    }
    # d2@1 went out before the refusal (read back: held); d1@150 in the second round;
    # d1@50 is late and comes back to be kept in late_points.
    assert (result.written, result.duplicates) == (1, 1)
    assert [(p.reading.ts_ns, p.field) for p in result.late] == [(T0_NS + 50 * S, "t")]
    # and the sink moves on: the next write is normal
    assert sink.write(_batch(_t("d1", 200, 200.0))) == WriteResult(1, 0)


@pytest.mark.integration
def test_restarted_sink_keeps_marks(standin: AkumuliStandin, tmp_path: Path) -> None:
    first = _sink(standin, tmp_path / "marks.db")
    assert first.write(_batch(_t("d1", 5, 1.0))) == WriteResult(1, 0)
    first.close()
    second = _sink(standin, tmp_path / "marks.db")
    try:  # known to be late from the marks file alone: no refusal, no connection lost
        result = second.write(_batch(_t("d1", 1, 2.0), _t("d1", 6, 3.0)))
        assert (result.written, len(result.late)) == (1, 1)
    finally:
        second.close()
    assert standin.errors_sent == []
    assert standin.series() == {D1_T: [(T0_NS + 5 * S, 1.0), (T0_NS + 6 * S, 3.0)]}


@pytest.mark.integration
def test_error_after_the_confirm_window_is_repaired_on_the_next_write(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    standin.fail_next("DB internal error", after_points=1, delay_s=0.3)  # > confirm_ms=50
    assert sink.write(_batch(_t("d1", 0, 0.0), _t("d1", 1, 1.0), _t("d1", 2, 2.0))
                      ) == WriteResult(3, 0)
    deadline = time.monotonic() + 5
    while not standin.errors_sent and time.monotonic() < deadline:
        time.sleep(0.02)
    assert standin.series() == {D1_T: [(T0_NS, 0.0)]}  # two points were lost silently
    sink.write(_batch(_t("d1", 3, 3.0)))
    assert standin.series() == {D1_T: [(T0_NS + i * S, float(i)) for i in range(4)]}


@pytest.mark.integration
def test_unreachable_server_fails_the_write_naming_the_url(tmp_path: Path) -> None:
    port = free_port()
    sink = AkumuliSink.from_url(f"akumuli://127.0.0.1:{port}?marks={tmp_path / 'm.db'}")
    try:
        with pytest.raises(SinkError, match=f"akumuli://127.0.0.1:{port}.*cannot connect"):
            sink.write(_batch(_t("d1", 0, 1.0)))
        assert sink.write([]) == WriteResult(0, 0)
    finally:
        sink.close()


@pytest.mark.integration
def test_readings_without_numbers_write_nothing(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    assert sink.write(_batch(("d1", T0_NS, b'{"s":"text","n":null}'))) == WriteResult(0, 0)
    assert standin.connections == 0


class _Crash(BaseException):
    """Stands for the process dying at this point (not an Exception: nothing catches it)."""


@pytest.mark.integration
@pytest.mark.parametrize("crash_at", ["after_send", "before_send"])
def test_crash_mid_write_then_recovery_stores_each_point_once(
        standin: AkumuliStandin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        crash_at: str) -> None:
    marks = tmp_path / "marks.db"
    first = _sink(standin, marks)
    first.write(_batch(_t("d1", 0, 0.0)))
    batch = _batch(_t("d1", 1, 1.0), _t("d2", 1, 1.0), _t("d1", 2, 2.0))

    def crash(*args: object, **kwargs: object) -> None:
        raise _Crash

    # after_send: Akumuli took the points, the marks commit never happened (equal
    # timestamps would be stored twice if resent); before_send: nothing left.
    if crash_at == "after_send":
        monkeypatch.setattr(first._store, "save", crash)
    else:
        monkeypatch.setattr(first.client, "send", crash)
    with pytest.raises(_Crash):
        first.write(batch)
    first.client.drop_connection()
    first._store._db.close()
    monkeypatch.undo()

    restarted = _sink(standin, marks)
    try:
        # The tail rewrites the interrupted range with recovering=True. d2 is a brand-new
        # series: before_send, Akumuli answers "-not found" for it, which means "nothing".
        result = restarted.write(batch, recovering=True)
        assert (result.written, result.duplicates) == (
            (0, 3) if crash_at == "after_send" else (3, 0))
        restarted.write(_batch(_t("d1", 3, 3.0)))
    finally:
        restarted.close()
    assert standin.series() == {D1_T: [(T0_NS + i * S, float(i)) for i in range(4)],
                                D2_T: [(T0_NS + S, 1.0)]}
    assert standin.errors_sent == []


@pytest.mark.integration
def test_recovery_never_sends_blind_when_the_query_api_is_down(
        standin: AkumuliStandin, tmp_path: Path) -> None:
    sink = AkumuliSink.from_url(f"akumuli://{standin.host}:{standin.port}?query_port="
                                f"{free_port()}&marks={tmp_path / 'm.db'}")
    try:
        batch = _batch(*[_t("d1", i, float(i)) for i in range(4)])
        standin.fail_next("DB internal error", after_points=2)
        with pytest.raises(SinkError, match="query API"):
            sink.write(batch)
        with pytest.raises(SinkError, match="query API"):  # still down: nothing is sent
            sink.write(batch, recovering=True)
        assert standin.connections == 1
        sink.client.query_port = standin.query_port  # the query API is back
        assert sink.write(batch, recovering=True) == WriteResult(2, 2)
    finally:
        sink.close()
    assert standin.series() == {D1_T: [(T0_NS + i * S, float(i)) for i in range(4)]}


def test_a_query_answered_with_an_empty_error_is_asked_again(
        sink: AkumuliSink, standin: AkumuliStandin) -> None:
    """akumulid 0.8.80 now and then answers a valid query with 400 and "-" (seen in CI on a
    new series); asked again, it answers. A 400 that says what is wrong is an error at once."""
    probe = [Point("rssi class=meter device=d1 location=lab", T0_NS, "+0.0")]
    standin.fail_queries_empty(2)
    assert sink.held_points(probe, newer=True) == {}
    standin.fail_queries_empty(10)  # more than the client asks: reported, naming the answer
    with pytest.raises(SinkError, match="query API answered 400: -"):
        sink.held_points(probe, newer=True)
