"""The Akumuli sink against a real ``akumulid`` (0.8.x), when one is on PATH.

AKUMULI.md (beside DESIGN.md) has the recipe that builds it; it takes long, so it is not
built here, and this module is skipped without it. Everything the stand-in imitates is
checked here against the real server: negative integers, raw CSV rows with ``ts=``,
``-not found`` for a new series, late points, and a recovery that stores nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ports import free_port
from support.processes import ProcessGroup
from support.storage import T0_NS, log_record, start_real_akumulid

from iotpipe.registry import Registry
from iotpipe.storage.enrich import StoredReading, enrich_records
from iotpipe.storage.sinks import SinkBatch
from iotpipe.storage.sinks.akumuli import AkumuliSink
from iotpipe.storage.sinks.akumuli.points import Point

pytestmark = pytest.mark.integration

S = 1_000_000_000
REGISTRY = Registry.from_yaml("devices: {d1: {class: meter, location: lab}}")
RSSI = "rssi class=meter device=d1 location=lab"

@pytest.fixture
def akumulid(procs: ProcessGroup, tmp_path: Path) -> Iterator[tuple[int, int]]:
    tcp_port, http_port = free_port(), free_port()
    if not start_real_akumulid(procs, tmp_path / "akumuli", tcp_port, http_port):
        pytest.skip("akumulid is not on PATH (build recipe: /work/shared/AKUMULI.md)")
    yield tcp_port, http_port


def _readings(*items: tuple[int, bytes]) -> list[StoredReading]:
    records = [log_record("d1", f"m{i}", ts, data, node_seq=i)
               for i, (ts, data) in enumerate(items, 1)]
    readings, _ = enrich_records(1, records, REGISTRY)
    return readings


def test_real_akumuli_negative_values_late_points_and_recovery(
        akumulid: tuple[int, int], tmp_path: Path) -> None:
    tcp_port, http_port = akumulid
    sink = AkumuliSink.from_url(f"akumuli://127.0.0.1:{tcp_port}?query_port={http_port}"
                                f"&marks={tmp_path / 'marks.db'}&confirm_ms=200")
    probe = [Point(RSSI, T0_NS, "+0.0")]
    try:
        # A series that does not exist yet: the server answers "-not found", i.e. nothing.
        assert sink.held_points(probe, newer=True) == {}
        first = _readings((T0_NS + 2 * S, b'{"rssi":-36}'), (T0_NS, b'{"rssi":-40}'),
                          (T0_NS + 2 * S, b'{"rssi":-37}'))  # equal timestamp: kept twice
        result = sink.write([SinkBatch("store", 1, first)])
        assert (result.written, result.duplicates, result.late) == (3, 0, ())
        deadline = time.monotonic() + 10
        while (sum(len(v) for v in sink.held_points(probe, newer=True).values()) < 3
               and time.monotonic() < deadline):
            time.sleep(0.1)  # the query API reads the real rows ("series,ts=<ns>,value")
        held = {(RSSI, T0_NS): [-40.0], (RSSI, T0_NS + 2 * S): [-36.0, -37.0]}
        assert sink.held_points(probe, newer=True) == held
        # The same range again after a "crash": nothing twice.
        again = sink.write([SinkBatch("store", 1, first)], recovering=True)
        assert (again.written, again.duplicates) == (0, 3)
        # A late point is kept apart, never sent (it would cost the connection).
        late = sink.write([SinkBatch("store", 4, _readings((T0_NS + S, b'{"rssi":-50}')))])
        assert late.written == 0 and [p.value for p in late.late] == ["-50.0"]
        assert sink.held_points(probe, newer=True) == held
    finally:
        sink.close()


def test_real_akumuli_late_write_from_lost_marks_is_resolved_exactly(
        akumulid: tuple[int, int], tmp_path: Path) -> None:
    tcp_port, http_port = akumulid
    url = f"akumuli://127.0.0.1:{tcp_port}?query_port={http_port}&confirm_ms=200"
    first = AkumuliSink.from_url(f"{url}&marks={tmp_path / 'a.db'}")
    try:
        assert first.write([SinkBatch("store", 1, _readings((T0_NS + 10 * S, b'{"rssi":-1}')))
                            ]).written == 1
    finally:
        first.close()
    # A sink whose marks file was lost: it does not know the server holds d1@10 s. Its send
    # (d1@5 s, then d1@20 s) is refused with "-DB late write" and the connection closed;
    # the sink reads back, keeps 5 s as late and stores 20 s - once.
    second = AkumuliSink.from_url(f"{url}&marks={tmp_path / 'b.db'}")
    probe = [Point(RSSI, T0_NS, "+0.0")]
    try:
        result = second.write([SinkBatch("store", 2, _readings(
            (T0_NS + 5 * S, b'{"rssi":-5}'), (T0_NS + 20 * S, b'{"rssi":-20}')))])
        assert result.written == 1
        assert [(p.reading.ts_ns, p.value) for p in result.late] == [(T0_NS + 5 * S, "-5.0")]
        deadline = time.monotonic() + 10
        while (sum(len(v) for v in second.held_points(probe, newer=True).values()) < 2
               and time.monotonic() < deadline):
            time.sleep(0.1)
        assert second.held_points(probe, newer=True) == {(RSSI, T0_NS + 10 * S): [-1.0],
                                             (RSSI, T0_NS + 20 * S): [-20.0]}
    finally:
        second.close()
