"""The storage loop in-process: sink failures, ack-after-write, registry reload, stop."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import free_port
from prometheus_client import CollectorRegistry
from storage_helpers import FakeFeed, make_log

from iotpipe.registry import RegistryWatcher
from iotpipe.storage.server import StorageMetrics, StorageService, StorageSettings
from iotpipe.storage.sinks import SinkBatch, SinkError, WriteResult
from iotpipe.storage.sinks.sqlite import SqliteSink

pytestmark = pytest.mark.integration


class FlakySink:
    """Records what it was given; fails while ``failing`` is set."""

    kind = "flaky"
    url = "flaky://test"

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.attempts = 0
        self.stored: list[str] = []
        self.acked_at_write: list[int] = []
        self.feed: FakeFeed | None = None

    def write(self, batches: Sequence[SinkBatch]) -> WriteResult:
        self.attempts += 1
        if self.failing.is_set():
            raise SinkError("flaky://test: disk on fire")
        if self.feed is not None:
            self.acked_at_write.append(self.feed.acked_count())
        readings = [r for b in batches for r in b.readings]
        self.stored.extend(r.msg_id for r in readings)
        return WriteResult(len(readings), 0)

    def close(self) -> None:
        pass


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[object]:
    running: list[tuple[StorageService, threading.Thread, list[int]]] = []

    def make(feed: FakeFeed, sinks: list[object], registry_file: Path | None = None
             ) -> tuple[StorageService, list[int], CollectorRegistry]:
        settings = StorageSettings(feed_endpoints=[feed.endpoint], consumer_id="svc",
                                   heartbeat=0.1, window=100,
                                   registry_file=str(registry_file or tmp_path / "none.yaml"))
        metrics_registry = CollectorRegistry()
        service = StorageService(settings, sinks,  # type: ignore[arg-type]
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


def test_no_ack_until_every_sink_wrote_and_failing_sink_is_retried_alone(
    tmp_path: Path, service_factory: object
) -> None:
    feed = FakeFeed(f"tcp://127.0.0.1:{free_port()}", make_log(50), batch=50).start()
    good = SqliteSink(tmp_path / "good.db")
    flaky = FlakySink()
    flaky.feed = feed
    flaky.failing.set()
    try:
        service, _, metrics = service_factory(feed, [good, flaky])  # type: ignore[operator]
        wait_for(lambda: flaky.attempts >= 3, 10, "retries of the failing sink")
        assert feed.acked_count() == 0  # the good sink wrote; the batch is still not acked
        assert good.count(None, None, None) == 50
        assert not service.ready
        assert metrics.get_sample_value("iotpipe_storage_write_errors_total",
                                        {"sink": "flaky"}) >= 3
        # The good sink was written once, not again at every retry of the flaky one.
        assert metrics.get_sample_value("iotpipe_storage_write_seconds_count",
                                        {"sink": "sqlite"}) == 1
        flaky.failing.clear()
        wait_for(lambda: feed.acked_count() == 50, 10, "ack after the sink recovered")
        assert flaky.acked_at_write == [0]  # nothing was acked before the write returned
        assert sorted(flaky.stored) == sorted(f"m-{i}" for i in range(1, 51))
        assert service.ready
    finally:
        feed.stop()
        good.close()


def test_stop_while_sink_fails_gives_the_batch_up_unacked(
    tmp_path: Path, service_factory: object
) -> None:
    feed = FakeFeed(f"tcp://127.0.0.1:{free_port()}", make_log(20)).start()
    flaky = FlakySink()
    flaky.failing.set()
    try:
        service, exit_codes, _ = service_factory(feed, [flaky])  # type: ignore[operator]
        wait_for(lambda: flaky.attempts >= 1, 10, "a write attempt")
        service.stop()
        wait_for(lambda: exit_codes == [1], 10, "run() to return 1")
        time.sleep(0.2)
        assert feed.acked_count() == 0
        assert feed.requests[-1].credit == 0 and feed.requests[-1].acks == []
    finally:
        feed.stop()


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
