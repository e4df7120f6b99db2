"""Sans-I/O parts of the storage tier: consumer core, enrichment, sqlite sink, query."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from support.storage import T0_NS, log_record, make_log

from iotpipe import wire
from iotpipe.registry import Registry
from iotpipe.storage.core import FeedConsumer, WriteBackoff, listed_twice, merge_ranges
from iotpipe.storage.enrich import StoredReading, enrich_records
from iotpipe.storage.query import format_ts, parse_time, reading_to_json
from iotpipe.storage.sinks import SinkBatch, SinkError, WriteResult, open_sink
from iotpipe.storage.sinks.sqlite import SqliteSink

pytestmark = pytest.mark.unit

REGISTRY = Registry.from_yaml("""
devices:
  dev-1: {class: boiler, location: hall-2, labels: {line: 3}}
prefixes:
  dev-: {class: sensor, location: plant-a}
""")


# -- consumer core -----------------------------------------------------------------------

def _delivery_frames(first: int, n: int, group: str = "storage") -> list[bytes]:
    return wire.encode_records(group, "middle-0", first, make_log(first + n - 1)[first - 1:])


def test_first_request_is_immediate_with_full_credit() -> None:
    consumer = FeedConsumer("storage", "c1", window=100, heartbeat_s=1.0)
    assert consumer.request_due(0.0)
    request = wire.decode_feed_request(consumer.make_request(0.0))
    assert request == wire.FeedRequest("storage", "c1", 100, [])
    assert not consumer.request_due(0.5)
    assert consumer.seconds_until_due(0.5) == pytest.approx(0.5)
    assert consumer.request_due(1.0)  # heartbeat restates credit


def test_credit_shrinks_with_records_in_hand_and_acks_follow_stores() -> None:
    consumer = FeedConsumer("storage", "c1", window=100, heartbeat_s=1.0)
    consumer.make_request(0.0)
    first = consumer.on_frames(_delivery_frames(1, 30))
    second = consumer.on_frames(_delivery_frames(31, 50))
    assert first is not None and second is not None
    assert (first.first, first.last, second.first, second.last) == (1, 30, 31, 80)
    assert consumer.in_hand == 80
    assert not consumer.request_due(0.1)  # nothing stored yet: no early request

    consumer.stored(second)  # out of order is fine
    assert consumer.request_due(0.1)
    request = wire.decode_feed_request(consumer.make_request(0.1))
    # Credit is the window (the middle subtracts what it has outstanding), not an increment.
    assert request.acks == [(31, 80)] and request.credit == 100
    assert consumer.in_hand == 30

    consumer.stored(first)
    request = wire.decode_feed_request(consumer.make_request(0.2))
    assert request.acks == [(1, 30)] and request.credit == 100
    assert consumer.last_acked == 80
    assert consumer.pending_acks == []


def test_adjacent_acks_are_merged_in_one_request() -> None:
    consumer = FeedConsumer("storage", "c1", window=1000)
    deliveries = [consumer.on_frames(_delivery_frames(f, 10)) for f in (1, 11, 21, 41)]
    for delivery in deliveries:
        assert delivery is not None
        consumer.stored(delivery)
    request = wire.decode_feed_request(consumer.make_request(0.0))
    assert request.acks == [(1, 30), (41, 50)]


def test_overshooting_delivery_is_taken() -> None:
    consumer = FeedConsumer("storage", "c1", window=10)
    delivery = consumer.on_frames(_delivery_frames(1, 25))
    assert delivery is not None and len(delivery.records) == 25
    assert consumer.in_hand == 25 and consumer.credit == 10


def test_other_group_and_malformed_are_ignored() -> None:
    consumer = FeedConsumer("storage", "c1", window=10)
    assert consumer.on_frames(_delivery_frames(1, 3, group="archive")) is None
    with pytest.raises(wire.WireError):
        consumer.on_frames([wire.KIND_RECORDS, b"\xc1"])
    assert consumer.ignored == 2 and consumer.in_hand == 0


def test_final_request_acks_and_stops_credit() -> None:
    consumer = FeedConsumer("storage", "c1", window=10)
    delivery = consumer.on_frames(_delivery_frames(5, 3))
    assert delivery is not None
    consumer.stored(delivery)
    assert wire.decode_feed_request(consumer.final_request()) == wire.FeedRequest(
        "storage", "c1", 0, [(5, 7)])


def test_abandon_releases_credit_without_ack() -> None:
    consumer = FeedConsumer("storage", "c1", window=10)
    delivery = consumer.on_frames(_delivery_frames(1, 4))
    assert delivery is not None
    consumer.abandon(delivery)
    assert consumer.in_hand == 0 and consumer.pending_acks == []


def test_bad_consumer_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="window"):
        FeedConsumer("storage", "c1", window=0)
    with pytest.raises(ValueError, match="heartbeat"):
        FeedConsumer("storage", "c1", heartbeat_s=0)


def test_merge_ranges() -> None:
    assert merge_ranges([(5, 6), (1, 2), (3, 4), (8, 9), (9, 12)]) == [(1, 6), (8, 12)]
    assert merge_ranges([]) == []


# -- enrichment --------------------------------------------------------------------------

def test_enrichment_denormalises_and_marks_unknown() -> None:
    records = [
        log_record("dev-1", "a", T0_NS, b'{"t":21.5}', node="n-p0", node_seq=7),
        log_record("dev-77", "b", T0_NS + 1),
        log_record("valve-3", "c", T0_NS + 2),
    ]
    stored, rejected = enrich_records(100, records, REGISTRY)
    assert rejected == []
    assert stored[0] == StoredReading("dev-1", "a", T0_NS, T0_NS + 1000, "n-p0", 7,
                                      '{"t":21.5}', "boiler", "hall-2", {"line": "3"})
    assert (stored[1].device_class, stored[1].location) == ("sensor", "plant-a")
    assert (stored[2].device_class, stored[2].location, stored[2].labels) == (
        "unknown", "unknown", {})


def test_enrichment_rejects_bad_records_by_seq_and_keeps_the_rest() -> None:
    records = [
        log_record("dev-1", "a", T0_NS),
        b"\xc1",
        wire.encode_log_record("n", 1, b"not a reading"),
        log_record("dev-2", "d", T0_NS, b"\xff\xfe"),
        log_record("dev-3", "e", T0_NS),
    ]
    stored, rejected = enrich_records(10, records, REGISTRY)
    assert [r.msg_id for r in stored] == ["a", "e"]
    assert [r.seq for r in rejected] == [11, 12, 13]
    assert "log record" in rejected[0].reason
    assert "reading" in rejected[1].reason
    assert "UTF-8" in rejected[2].reason


# -- sqlite sink -------------------------------------------------------------------------

def _stored(n: int, first: int = 1) -> list[StoredReading]:
    stored, _ = enrich_records(first, make_log(first + n - 1)[first - 1:], REGISTRY)
    return stored


def test_sqlite_same_batch_twice_is_stored_once(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "db" / "readings.db")
    batch = SinkBatch("middle-0", 1, _stored(100))
    assert sink.write([batch]) == WriteResult(100, 0)
    assert sink.write([batch]) == WriteResult(0, 100)
    # A redelivery with other boundaries: only the new part is stored.
    assert sink.write([SinkBatch("middle-0", 51, _stored(100, first=51))]) == WriteResult(50, 50)
    assert sink.count(None, None, None) == 150
    sink.close()


def test_sqlite_settings_schema_and_durability_mode(tmp_path: Path) -> None:
    path = tmp_path / "readings.db"
    sink = SqliteSink(path)
    sink.write([SinkBatch("m", 1, _stored(3))])
    assert sink._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert sink._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    sink.close()
    db = sqlite3.connect(path)
    columns = [row[1] for row in db.execute("PRAGMA table_info(readings)")]
    assert columns == ["device_id", "msg_id", "ts_ns", "received_ns", "node", "node_seq",
                       "data", "device_class", "location", "labels"]
    indexes = {row[1] for row in db.execute("PRAGMA index_list(readings)")}
    assert "readings_device_ts" in indexes
    row = db.execute("SELECT device_class, location, labels FROM readings "
                     "WHERE device_id='dev-1'").fetchone()
    assert row == ("boiler", "hall-2", '{"line":"3"}')
    db.close()


def test_sqlite_query_by_device_and_time(tmp_path: Path) -> None:
    sink = SqliteSink(tmp_path / "readings.db")
    sink.write([SinkBatch("m", 1, _stored(50))])
    reader = open_sink(f"sqlite://{tmp_path}/readings.db", read_only=True)
    # dev-1 has i = 1, 6, 11, ...; ts = T0 + i s.
    rows = list(reader.query("dev-1", T0_NS + 6_000_000_000, T0_NS + 21_000_000_000, None))
    assert [r.msg_id for r in rows] == ["m-6", "m-11", "m-16"]
    assert rows[0].labels == {"line": "3"}
    assert [r.msg_id for r in reader.query("dev-1", None, None, 2)] == ["m-1", "m-6"]
    assert reader.count("dev-1", None, None) == 10
    assert reader.count(None, T0_NS + 45_000_000_000, None) == 6
    reader.close()
    sink.close()


def test_open_sink_errors_name_the_url(tmp_path: Path) -> None:
    with pytest.raises(SinkError, match=r"'mongodb://x'.*unknown scheme"):
        open_sink("mongodb://x")
    with pytest.raises(SinkError, match="no scheme"):
        open_sink("/just/a/path")
    with pytest.raises(SinkError, match="not found"):
        open_sink(f"sqlite://{tmp_path}/missing.db", read_only=True)


# -- query helpers -----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1764151200", T0_NS),
        ("1764151200.25", T0_NS + 250_000_000),
        ("2025-11-26T10:00:00Z", T0_NS),
        ("2025-11-26T10:00:00.000000001Z", T0_NS + 1),
        ("2025-11-26T11:00:00.5+01:00", T0_NS + 500_000_000),
        ("2025-11-26 10:00:00", T0_NS),
    ],
)
def test_parse_time(text: str, expected: int) -> None:
    assert parse_time(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "2025-13-01T00:00:00Z", "1.2.3"])
def test_parse_time_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="neither RFC 3339 nor epoch"):
        parse_time(text)


def test_json_output_shape() -> None:
    reading = _stored(1)[0]
    assert format_ts(T0_NS + 5) == "2025-11-26T10:00:00.000000005Z"
    out = reading_to_json(reading)
    assert out["data"] == {"i": 1}
    assert out["class"] == "boiler" and out["labels"] == {"line": "3"}


# -- settings ----------------------------------------------------------------------------

def test_storage_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from iotpipe.settings import parse_settings
    from iotpipe.storage.settings import StorageSettings

    monkeypatch.setenv("IOTPIPE_STORAGE_FEED_ENDPOINTS", "tcp://m0:5557, tcp://m1:5557")
    monkeypatch.setenv("IOTPIPE_STORAGE_DATA_DIR", "/data/store")
    monkeypatch.setenv("IOTPIPE_STORAGE_GROUP", "archive")
    settings = parse_settings(StorageSettings, ["--group", "storage", "--window", "64"])
    assert settings.feed_endpoints == ["tcp://m0:5557", "tcp://m1:5557"]
    assert settings.group == "storage" and settings.window == 64  # flags win over env
    assert settings.sink_urls() == ["sqlite:///data/store/readings.db"]
    monkeypatch.setenv("IOTPIPE_STORAGE_SINKS", "sqlite:///a.db,parquet:///lake")
    assert parse_settings(StorageSettings, []).sink_urls() == ["sqlite:///a.db",
                                                                "parquet:///lake"]


def test_write_backoff_doubles_up_to_its_cap_and_starts_over_after_a_success() -> None:
    backoff = WriteBackoff(first=0.1, cap=1.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next_delay() == 0.1


def test_listed_twice_names_each_repeated_sink_cursor_once() -> None:
    assert listed_twice(["sqlite:/a", "vm:x", "parquet:/p", "vm:x", "vm:x", "parquet:/p"]) \
        == ["parquet:/p", "vm:x"]
    assert listed_twice(["sqlite:/a", "vm:x"]) == []

