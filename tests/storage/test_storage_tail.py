"""Tailing sinks without sockets: cursors, recovery of an interrupted range, late points,
Parquet without repeats, store retention, and which sinks the settings name."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson
import pyarrow.dataset as ds
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from support.storage import make_log
from support.waiting import wait_for

from iotpipe.registry import Registry
from iotpipe.settings import parse_settings
from iotpipe.storage.enrich import enrich_records
from iotpipe.storage.query import main as query_main
from iotpipe.storage.settings import StorageSettings
from iotpipe.storage.sinks import LatePoint, SinkBatch, SinkError, WriteResult
from iotpipe.storage.sinks.parquet import ParquetSink
from iotpipe.storage.sinks.sqlite import SqliteSink
from iotpipe.storage.tail import CursorStore, SinkWorker, TailMetrics

pytestmark = pytest.mark.unit


def _metrics() -> TailMetrics:
    registry = CollectorRegistry()
    return TailMetrics(
        registry, Counter("w", "w", ["sink"], registry=registry),
        Counter("d", "d", ["sink"], registry=registry),
        Counter("e", "e", ["sink"], registry=registry),
        Histogram("s", "s", ["sink"], registry=registry))


def _fill(store: SqliteSink, n: int, first: int = 1) -> None:
    log = make_log(first + n - 1)[first - 1:]
    readings, _ = enrich_records(first, log, Registry.from_yaml("{}"))
    store.write([SinkBatch("middle-0", first, readings)])


class RecordingSink:
    kind = "rec"
    url = "rec://x"

    def __init__(self, late_every: int = 0) -> None:
        self.calls: list[tuple[int, list[str], bool]] = []
        self.late_every = late_every
        self.fail = threading.Event()

    def write(self, batches: Sequence[SinkBatch], *, recovering: bool = False) -> WriteResult:
        if self.fail.is_set():
            raise SinkError("rec://x: refused")
        ids = [r.msg_id for b in batches for r in b.readings]
        self.calls.append((batches[0].first, ids, recovering))
        late = [LatePoint(r, "i", "+1.0", "late write refused")
                for i, r in enumerate(batches[0].readings)
                if self.late_every and i % self.late_every == 0]
        return WriteResult(len(ids) - len(late), 0, late)

    def close(self) -> None:
        pass


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteSink]:
    opened = SqliteSink(tmp_path / "readings.db")
    yield opened
    opened.close()


def test_worker_copies_every_row_once_in_ranges_and_records_late_points(
        store: SqliteSink) -> None:
    _fill(store, 25)
    sink = RecordingSink(late_every=10)
    worker = SinkWorker(sink, store.path, _metrics(), batch_rows=10).start()
    try:
        wait_for(lambda: worker.state.state == "caught up", 10, "caught up")
        _fill(store, 5, first=26)
        worker.wake.set()
        wait_for(lambda: sum(len(ids) for _, ids, _ in sink.calls) == 30, 10, "new rows")
    finally:
        worker.stop()
    assert [first for first, _, _ in sink.calls] == [1, 11, 21, 26]
    assert [m for _, ids, _ in sink.calls for m in ids] == [f"m-{i}" for i in range(1, 31)]
    # A sink without a cursor is back-filled reading back first (it may hold some rows);
    # once caught up, new rows are written plainly.
    assert [recovering for _, _, recovering in sink.calls] == [True, True, True, False]
    late = store.late_points()
    assert [(p.sink, p.msg_id) for p in late] == [
        ("rec://x", f"m-{i}") for i in (1, 11, 21, 26)]
    assert CursorStore(store.path, "rec://x").cursor() == (30, None)


def test_query_late_lists_the_refused_values(store: SqliteSink,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _fill(store, 3)
    cursors = CursorStore(store.path, "akumuli://tsdb")
    (_, first), *_ = cursors.rows_after(0, 10)
    cursors.finish(3, [LatePoint(first, "i", "+1.0", "older than its series' newest point")])
    cursors.close()
    assert query_main(["--db", str(store.path), "--late", "--json"]) == 0
    out = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(p["sink"], p["device_id"], p["msg_id"], p["field"], p["value"]) for p in out] == [
        ("akumuli://tsdb", "dev-1", "m-1", "i", "+1.0")]
    assert query_main(["--db", str(store.path), "--late", "--count", "--device", "dev-2"]) == 0
    assert capsys.readouterr().out.strip() == "0"


def test_interrupted_range_is_rewritten_exactly_with_recovering(store: SqliteSink) -> None:
    _fill(store, 30)
    cursors = CursorStore(store.path, "rec://x")
    cursors.finish(10, [])
    cursors.set_pending(17)  # a process died after marking rows 11..17 pending
    cursors.close()
    sink = RecordingSink()
    worker = SinkWorker(sink, store.path, _metrics(), batch_rows=100).start()
    try:
        wait_for(lambda: worker.state.state == "caught up", 10, "caught up")
    finally:
        worker.stop()
    assert sink.calls[0] == (11, [f"m-{i}" for i in range(11, 18)], True)
    assert sink.calls[1] == (18, [f"m-{i}" for i in range(18, 31)], False)
    assert len(sink.calls) == 2


def test_failed_write_retries_the_same_range_as_recovery_and_reports_state(
        store: SqliteSink) -> None:
    _fill(store, 12)
    sink = RecordingSink()
    sink.fail.set()
    metrics = _metrics()
    worker = SinkWorker(sink, store.path, metrics, batch_rows=100).start()
    try:
        wait_for(lambda: worker.state.state == "failing", 10, "failing")
        wait_for(lambda: worker.state.lag_rows == 12, 10, "lag")
        assert "refused" in worker.state.describe() and not worker.healthy
        sink.fail.clear()
        wait_for(lambda: worker.state.state == "caught up", 10, "recovered")
    finally:
        worker.stop()
    assert sink.calls == [(1, [f"m-{i}" for i in range(1, 13)], True)]
    assert worker.state.error == "" and worker.state.lag_rows == 0


def test_unexpected_error_restarts_the_worker_from_its_durable_cursor(
        store: SqliteSink, monkeypatch: pytest.MonkeyPatch) -> None:
    import iotpipe.storage.tail as tail

    monkeypatch.setattr(tail, "_RESTART_WAIT_S", 0.05)
    _fill(store, 5)
    CursorStore(store.path, "rec://x").close()  # not a back-fill: the cursor exists
    sink = RecordingSink()
    original = sink.write
    seen: list[str] = []

    def write_with_a_bug(batches: Sequence[SinkBatch], *, recovering: bool = False
                         ) -> WriteResult:
        if not seen:
            seen.append("boom")
            raise RuntimeError("boom")  # not a SinkError: a bug, or the store unreadable
        return original(batches, recovering=recovering)

    sink.write = write_with_a_bug  # type: ignore[method-assign]
    worker = SinkWorker(sink, store.path, _metrics()).start()
    try:
        wait_for(lambda: worker.state.state == "caught up", 10, "restarted and caught up")
    finally:
        worker.stop()
    # The range that was pending when it failed is rewritten as a recovery, once.
    assert sink.calls == [(1, [f"m-{i}" for i in range(1, 6)], True)]


def test_parquet_recovery_of_a_range_rewrites_the_same_files(
        store: SqliteSink, tmp_path: Path) -> None:
    _fill(store, 40)
    lake = ParquetSink(tmp_path / "lake")
    cursors = CursorStore(store.path, lake.url)
    rows = cursors.rows_after(0, 25)
    lake.write([SinkBatch(cursors.store_id(), 1, [r for _, r in rows])])  # written, then
    cursors.set_pending(25)  # the process died before the cursor moved
    cursors.close()
    worker = SinkWorker(lake, store.path, _metrics(), batch_rows=25).start()
    try:
        wait_for(lambda: worker.state.state == "caught up", 10, "caught up")
    finally:
        worker.stop()
    table = ds.dataset(tmp_path / "lake", format="parquet", partitioning="hive").to_table()
    ids = table["msg_id"].to_pylist()
    assert sorted(ids) == sorted(f"m-{i}" for i in range(1, 41)) and len(ids) == 40
    # A recreated store of record (new identity) never overwrites the earlier files.
    store_id = CursorStore(store.path, lake.url).store_id()
    other = SqliteSink(tmp_path / "other.db")
    other_id = CursorStore(other.path, lake.url).store_id()
    other.close()
    assert len(store_id) == 12 and other_id != store_id
    names = {p.name for p in (tmp_path / "lake").rglob("*.parquet")}
    assert names == {f"{store_id}-{1:020d}.parquet", f"{store_id}-{26:020d}.parquet"}


def test_store_retention_prunes_only_what_every_sink_holds(store: SqliteSink) -> None:
    _fill(store, 10)
    now = time.time_ns()
    assert store.prune(4, now) == 4  # rows 1..4: every sink holds them
    assert store.prune(None, now) == 5  # the newest row stays: rowids are never reused
    assert store.count(None, None, None) == 1
    assert store.prune(None, 0) == 0  # nothing received before the cutoff


def test_store_of_record_is_always_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOTPIPE_STORAGE_DATA_DIR", "/data/store")
    assert parse_settings(StorageSettings, ["--sinks", "parquet:///lake"]).sink_urls() == [
        "sqlite:///data/store/readings.db", "parquet:///lake"]
    assert parse_settings(StorageSettings, [
        "--sinks", "parquet:///lake,sqlite:///x.db,sqlite:///y.db"]).sink_urls() == [
        "sqlite:///x.db", "parquet:///lake", "sqlite:///y.db"]


def test_iotpipe_up_sinks_keep_the_embedded_store_first(tmp_path: Path) -> None:
    from iotpipe.local import UpSettings, build_children, plan_ports

    def storage_sinks(argv: list[str]) -> list[str]:
        settings = parse_settings(UpSettings, ["--base-port", "23000", *argv])
        spec = next(s for s in build_children(settings, plan_ports(settings), tmp_path,
                                              tmp_path / "r.yaml", None) if s.name == "storage")
        args = spec.argv[spec.argv.index("storage") + 1:]
        return parse_settings(StorageSettings, args).sink_urls()

    store = f"sqlite://{tmp_path.resolve()}/store/readings.db"
    assert storage_sinks([]) == [store]
    assert storage_sinks(["--sinks", "victoriametrics://127.0.0.1:8428,parquet:///lake"]) == [
        store, "victoriametrics://127.0.0.1:8428", "parquet:///lake"]
    assert storage_sinks(["--sinks", "parquet:///lake,sqlite:///elsewhere.db"]) == [
        "sqlite:///elsewhere.db", "parquet:///lake"]


def test_cursor_key_ignores_tuning_options_and_duplicates_are_refused(
        store: SqliteSink, tmp_path: Path) -> None:
    from iotpipe.registry import RegistryWatcher
    from iotpipe.storage.metrics import StorageMetrics
    from iotpipe.storage.server import StorageServer
    from iotpipe.storage.tail import cursor_key

    assert cursor_key("akumuli://h:8282?query_port=1&confirm_ms=5&marks=/m.db") == \
        "akumuli://h:8282"
    assert cursor_key("victoriametrics://h:8428?measurement=plant") == \
        "victoriametrics://h:8428?measurement=plant"
    assert cursor_key("parquet:///abs/lake") == "parquet:///abs/lake"
    # Changing a tuning option keeps the cursor: no back-fill, no rewrite.
    first = CursorStore(store.path, "akumuli://h:8282?confirm_ms=50")
    first.finish(7, [])
    again = CursorStore(store.path, "akumuli://h:8282?confirm_ms=20&query_port=9")
    assert (again.created, again.cursor()) == (False, (7, None))
    first.close()
    again.close()
    settings = StorageSettings(feed_endpoints=["tcp://127.0.0.1:1"], consumer_id="svc")
    twice = [store, RecordingSink(), RecordingSink()]
    with pytest.raises(ValueError, match="listed twice: rec://x"):
        StorageServer(settings, twice,  # type: ignore[arg-type]
                       RegistryWatcher(str(tmp_path / "none.yaml")),
                       StorageMetrics(CollectorRegistry()))
