"""The storage loop in-process: the store of record on the feed path, tailing sinks that
cannot stall it, registry reload, stop."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from support.ports import free_port
from support.storage import FakeFeed, make_log
from support.waiting import wait_for

from iotpipe.registry import RegistryWatcher
from iotpipe.storage.metrics import StorageMetrics
from iotpipe.storage.server import StorageServer
from iotpipe.storage.settings import StorageSettings
from iotpipe.storage.sinks import SinkBatch, SinkError, WriteResult
from iotpipe.storage.sinks.sqlite import SqliteSink

pytestmark = pytest.mark.integration


class FlakySink:
    """Records what it was given (and whether as a recovery); fails while ``failing``."""

    kind = "flaky"
    url = "flaky://test"

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.attempts = 0
        self.stored: list[str] = []
        self.recovering: list[bool] = []

    def write(self, batches: Sequence[SinkBatch], *, recovering: bool = False) -> WriteResult:
        self.attempts += 1
        self.recovering.append(recovering)
        if self.failing.is_set():
            raise SinkError("flaky://test: disk on fire")
        readings = [r for b in batches for r in b.readings]
        self.stored.extend(r.msg_id for r in readings)
        return WriteResult(len(readings), 0)

    def close(self) -> None:
        pass


class FailingStore(SqliteSink):
    """A store of record whose writes fail while ``failing`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.failing = threading.Event()
        self.attempts = 0

    def write(self, batches: Sequence[SinkBatch], *, recovering: bool = False) -> WriteResult:
        self.attempts += 1
        if self.failing.is_set():
            raise SinkError(f"{self.url}: disk on fire")
        return super().write(batches, recovering=recovering)


def count_rows(path: Path) -> int:
    """Rows in a store, read on a connection of its own (the service thread uses its own)."""
    reader = SqliteSink(path, read_only=True)
    try:
        return reader.count(None, None, None)
    finally:
        reader.close()


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[object]:
    running: list[tuple[StorageServer, threading.Thread, list[int]]] = []

    def make(feed: FakeFeed, sinks: list[object], registry_file: Path | None = None,
             **overrides: object) -> tuple[StorageServer, list[int], CollectorRegistry]:
        settings = StorageSettings(feed_endpoints=[feed.endpoint], consumer_id="svc",
                                   heartbeat=0.1, window=100,
                                   registry_file=str(registry_file or tmp_path / "none.yaml"),
                                   **overrides)
        metrics_registry = CollectorRegistry()
        service = StorageServer(settings, sinks,  # type: ignore[arg-type]
                                 RegistryWatcher(settings.registry_file, interval_s=0.05),
                                 StorageMetrics(metrics_registry))
        exit_codes: list[int] = []
        thread = threading.Thread(target=lambda: exit_codes.append(service.run()), daemon=True)
        thread.start()
        running.append((service, thread, exit_codes))
        return service, exit_codes, metrics_registry

    yield make
    for service, thread, _ in running:
        service.stop()
        thread.join(10)
        service.close()


def test_a_failing_sink_stalls_neither_the_feed_nor_the_store_and_catches_up(
    tmp_path: Path, service_factory: object
) -> None:
    log = make_log(50)
    feed = FakeFeed(f"tcp://127.0.0.1:{free_port()}", log, batch=50).start()
    store = SqliteSink(tmp_path / "store.db")
    flaky = FlakySink()
    flaky.failing.set()
    try:
        service, _, metrics = service_factory(feed, [store, flaky])  # type: ignore[operator]
        wait_for(lambda: flaky.attempts >= 3, 10, "retries of the failing sink")
        # The feed is acknowledged on the store of record alone: the middle keeps nothing
        # for the failing sink, and the store keeps filling while it is down.
        wait_for(lambda: feed.acked_count() == 50, 10, "acks while the sink fails")
        log.extend(make_log(80)[50:])
        wait_for(lambda: feed.acked_count() == 80, 10, "later records acked too")
        assert count_rows(store.path) == 80
        assert service.ready
        ok, detail = service.readiness()
        assert ok and "sink flaky://test: failing" in detail and "disk on fire" in detail
        assert metrics.get_sample_value("iotpipe_storage_write_errors_total",
                                        {"sink": "flaky"}) >= 3
        assert metrics.get_sample_value("iotpipe_storage_sink_up", {"sink": "flaky"}) == 0
        wait_for(lambda: (metrics.get_sample_value("iotpipe_storage_sink_lag_rows",
                                                   {"sink": "flaky"}) or 0) >= 50, 10,
                 "lag reported")
        assert flaky.recovering[1:] == [True] * (len(flaky.recovering) - 1)  # retries read back
        flaky.failing.clear()
        wait_for(lambda: len(flaky.stored) == 80, 20, "the sink caught up")
        assert sorted(flaky.stored) == sorted(f"m-{i}" for i in range(1, 81))  # each once
        wait_for(lambda: "sink flaky://test: caught up" in service.readiness()[1], 10,
                 "state caught up")
        assert metrics.get_sample_value("iotpipe_storage_sink_lag_rows",
                                        {"sink": "flaky"}) == 0
        assert metrics.get_sample_value("iotpipe_storage_sink_up", {"sink": "flaky"}) == 1
    finally:
        feed.stop()
        store.close()


def test_store_retention_prunes_only_what_every_sink_holds(
    tmp_path: Path, service_factory: object
) -> None:
    feed = FakeFeed(f"tcp://127.0.0.1:{free_port()}", make_log(50), batch=50).start()
    store = SqliteSink(tmp_path / "store.db")
    flaky = FlakySink()
    flaky.failing.set()
    try:
        _, _, metrics = service_factory(  # type: ignore[operator]
            feed, [store, flaky], store_retention=0.05)
        wait_for(lambda: feed.acked_count() == 50, 10, "acks")
        wait_for(lambda: flaky.attempts >= 3, 10, "retries of the failing sink")
        assert count_rows(store.path) == 50  # the failing sink holds none of them
        flaky.failing.clear()
        wait_for(lambda: len(flaky.stored) == 50, 20, "the sink caught up")
        # Now every sink holds them: all but the newest row go (rowids are never reused).
        wait_for(lambda: count_rows(store.path) == 1, 10, "pruning")
        # The counter moves just after the prune commits: wait for it, not for the rows.
        wait_for(lambda: metrics.get_sample_value("iotpipe_storage_store_pruned_total") == 49,
                 10, "49 pruned rows counted")
        assert count_rows(store.path) == 1
    finally:
        feed.stop()
        store.close()


def test_stop_while_the_store_fails_gives_the_batch_up_unacked(
    tmp_path: Path, service_factory: object
) -> None:
    feed = FakeFeed(f"tcp://127.0.0.1:{free_port()}", make_log(20)).start()
    store = FailingStore(tmp_path / "store.db")
    store.failing.set()
    try:
        service, exit_codes, _ = service_factory(feed, [store])  # type: ignore[operator]
        wait_for(lambda: store.attempts >= 1, 10, "a write attempt")
        assert not service.ready  # the store of record failing is what makes it unready
        service.stop()
        wait_for(lambda: exit_codes == [1], 10, "run() to return 1")
        time.sleep(0.2)
        assert feed.acked_count() == 0
        assert feed.requests[-1].credit == 0 and feed.requests[-1].acks == []
    finally:
        feed.stop()
        store.close()


def test_first_sink_must_be_the_store_of_record(tmp_path: Path) -> None:
    settings = StorageSettings(feed_endpoints=["tcp://127.0.0.1:1"], consumer_id="svc")
    with pytest.raises(ValueError, match="store of record"):
        StorageServer(settings, [FlakySink()],  # type: ignore[list-item]
                       RegistryWatcher(str(tmp_path / "none.yaml")),
                       StorageMetrics(CollectorRegistry()))


def test_registry_change_applies_to_later_readings(
    tmp_path: Path, service_factory: object
) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text("prefixes: {dev-: {class: sensor}}\n")
    log = make_log(20)
    feed = FakeFeed(f"tcp://127.0.0.1:{free_port()}", log).start()
    sink = SqliteSink(tmp_path / "store.db")
    try:
        service_factory(feed, [sink], registry)  # type: ignore[operator]
        wait_for(lambda: feed.acked_count() == 20, 10, "first records")
        registry.write_text("prefixes: {dev-: {class: sensor-v2}}\n")
        st = registry.stat()
        os.utime(registry, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        time.sleep(0.2)  # more than the watcher's interval
        log.extend(make_log(40)[20:])
        wait_for(lambda: feed.acked_count() == 40, 10, "later records")
        classes = {r.msg_id: r.device_class for r in sink.query(None, None, None, None)}
        assert {classes[f"m-{i}"] for i in range(1, 21)} == {"sensor"}
        assert {classes[f"m-{i}"] for i in range(21, 41)} == {"sensor-v2"}
    finally:
        feed.stop()
        sink.close()
