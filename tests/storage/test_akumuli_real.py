"""The Akumuli sink against a real ``akumulid`` (0.8.x), when one is on PATH.

AKUMULI.md (beside DESIGN.md) has the recipe that builds it; it takes long, so it is not
built here, and this module is skipped without it. Everything the stand-in imitates is
checked here against the real server: negative integers, raw CSV rows with ``ts=``,
``-not found`` for a new series, late points, and a recovery that stores nothing twice.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ProcessGroup, free_port
from storage_helpers import T0_NS, log_record

from iotpipe.registry import Registry
from iotpipe.storage.enrich import StoredReading, enrich_records
from iotpipe.storage.sinks import SinkBatch
from iotpipe.storage.sinks.akumuli import AkumuliSink, Point

pytestmark = pytest.mark.integration

S = 1_000_000_000
REGISTRY = Registry.from_yaml("devices: {d1: {class: meter, location: lab}}")
RSSI = "rssi class=meter device=d1 location=lab"

CONFIG = """path={root}/db
nvolumes=2
volume_size=64MB

[HTTP]
port={http_port}
bind_addr=127.0.0.1

[TCP]
port={tcp_port}
bind_addr=127.0.0.1
pool_size=1

[WAL]
path={root}/wal
volume_size=16MB
nvolumes=2

log4j.rootLogger=info, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=%d [%t] %c [%p] %m%n
log4j.appender.file.filename={root}/akumuli.log
"""


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
def akumulid(procs: ProcessGroup, tmp_path: Path) -> Iterator[tuple[int, int]]:
    binary = shutil.which("akumulid")
    if binary is None:
        pytest.skip("akumulid is not on PATH (build recipe: /work/shared/AKUMULI.md)")
    root = tmp_path / "akumuli"
    (root / "db").mkdir(parents=True)
    (root / "wal").mkdir()
    tcp_port, http_port = free_port(), free_port()
    config = root / "akumulid.conf"
    config.write_text(CONFIG.format(root=root, http_port=http_port, tcp_port=tcp_port))
    subprocess.run([binary, "--create", "--config", str(config)], check=True, timeout=120,
                   capture_output=True)
    procs.start([binary, "--config", str(config)], name="akumulid")
    deadline = time.monotonic() + 30
    while not (_port_open(tcp_port) and _port_open(http_port)):
        if time.monotonic() > deadline:
            raise AssertionError("akumulid did not start:\n" + procs.log("akumulid"))
        time.sleep(0.1)
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
        assert sink.held_points(probe) == {}
        first = _readings((T0_NS + 2 * S, b'{"rssi":-36}'), (T0_NS, b'{"rssi":-40}'),
                          (T0_NS + 2 * S, b'{"rssi":-37}'))  # equal timestamp: kept twice
        result = sink.write([SinkBatch("store", 1, first)])
        assert (result.written, result.duplicates, result.late) == (3, 0, ())
        deadline = time.monotonic() + 10
        while (sum(len(v) for v in sink.held_points(probe).values()) < 3
               and time.monotonic() < deadline):
            time.sleep(0.1)  # the query API reads the real rows ("series,ts=<ns>,value")
        held = {(RSSI, T0_NS): [-40.0], (RSSI, T0_NS + 2 * S): [-36.0, -37.0]}
        assert sink.held_points(probe) == held
        # The same range again after a "crash": nothing twice.
        again = sink.write([SinkBatch("store", 1, first)], recovering=True)
        assert (again.written, again.duplicates) == (0, 3)
        # A late point is kept apart, never sent (it would cost the connection).
        late = sink.write([SinkBatch("store", 4, _readings((T0_NS + S, b'{"rssi":-50}')))])
        assert late.written == 0 and [p.value for p in late.late] == ["-50.0"]
        assert sink.held_points(probe) == held
    finally:
        sink.close()
