"""The Parquet data-lake sink: layout, atomic idempotent files, reading back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow.dataset as ds
import pytest
from support.storage import T0_NS, log_record, make_log

from iotpipe.registry import Registry
from iotpipe.storage.enrich import enrich_records
from iotpipe.storage.sinks import ReadableSink, SinkBatch, SinkError, WriteResult, open_sink
from iotpipe.storage.sinks.parquet import ParquetSink

pytestmark = pytest.mark.unit

REGISTRY = Registry.from_yaml("""
devices:
  dev-1: {class: boiler/v2, location: hall-2, labels: {line: 3}}
prefixes:
  dev-: {class: sensor, location: plant-a}
""")
DAY_NS = 86_400 * 1_000_000_000


def _batch(first: int, n: int, log: list[bytes]) -> SinkBatch:
    readings, _ = enrich_records(first, log[first - 1: first - 1 + n], REGISTRY)
    return SinkBatch("middle-0", first, readings)


def test_files_partitioned_by_date_and_class_and_rewritten_not_duplicated(
    tmp_path: Path
) -> None:
    sink = open_sink(f"parquet://{tmp_path}/lake")
    assert isinstance(sink, ParquetSink)
    log = make_log(40)
    log.append(log_record("dev-1", "late", T0_NS + DAY_NS, b'{"x":1}', node_seq=41))
    assert sink.write([_batch(1, 41, log)]) == WriteResult(41, 0)
    files = sorted(str(p.relative_to(tmp_path / "lake")) for p in (tmp_path / "lake").rglob("*")
                   if p.is_file())
    assert files == [
        "date=2025-11-26/class=boiler%2Fv2/middle-0-00000000000000000001.parquet",
        "date=2025-11-26/class=sensor/middle-0-00000000000000000001.parquet",
        "date=2025-11-27/class=boiler%2Fv2/middle-0-00000000000000000001.parquet",
    ]
    # The same delivery again overwrites the same files: still 41 rows on disk.
    sink.write([_batch(1, 41, log)])
    assert ds.dataset(tmp_path / "lake", format="parquet").count_rows() == 41
    # Partition columns come back through Hive discovery (class decoded).
    table = ds.dataset(tmp_path / "lake", format="parquet", partitioning="hive").to_table()
    assert set(table["class"].to_pylist()) == {"boiler/v2", "sensor"}
    sink.close()


def test_query_filters_and_drops_repeats_from_other_boundaries(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path / "lake")
    log = make_log(100)
    sink.write([_batch(1, 60, log), _batch(61, 40, log)])
    sink.write([_batch(41, 60, log)])  # redelivery with other boundaries: rows 41..100 twice
    assert ds.dataset(tmp_path / "lake", format="parquet").count_rows() == 160
    reader = open_sink(f"parquet://{tmp_path}/lake", read_only=True)
    assert isinstance(reader, ReadableSink)
    assert reader.count(None, None, None) == 100
    rows = list(reader.query("dev-1", T0_NS + 6_000_000_000, T0_NS + 21_000_000_000, None))
    assert [r.msg_id for r in rows] == ["m-6", "m-11", "m-16"]
    assert (rows[0].device_class, rows[0].labels, rows[0].ts_ns) == (
        "boiler/v2", {"line": "3"}, T0_NS + 6_000_000_000)
    assert [r.msg_id for r in reader.query("dev-2", None, None, 2)] == ["m-2", "m-7"]
    assert reader.count("nobody", None, None) == 0


def test_no_temp_files_left_and_missing_dir_is_an_error(tmp_path: Path) -> None:
    sink = ParquetSink(tmp_path / "lake")
    sink.write([_batch(1, 10, make_log(10))])
    assert not [p for p in (tmp_path / "lake").rglob(".tmp-*")]
    with pytest.raises(SinkError, match="not found"):
        open_sink(f"parquet://{tmp_path}/nowhere", read_only=True)
    with pytest.raises(SinkError, match="no directory"):
        open_sink("parquet://")


def test_query_cli_reads_the_lake(tmp_path: Path) -> None:
    ParquetSink(tmp_path / "lake").write([_batch(1, 20, make_log(20))])
    result = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "query", "--sink", f"parquet://{tmp_path}/lake",
         "--device", "dev-1", "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert [line["msg_id"] for line in lines] == ["m-1", "m-6", "m-11", "m-16"]
    assert lines[0]["class"] == "boiler/v2" and lines[0]["data"] == {"i": 1}
