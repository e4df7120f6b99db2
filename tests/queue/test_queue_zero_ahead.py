"""The fdatasync backend writes zeros ahead of its records: fewer extent conversions per
sync, the same bytes on disk (the space past the tail stays zeros) and the same recovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotpipe.queue import PersistentQueue
from iotpipe.queue.fileio import OsFileIO
from iotpipe.queue.writer import ZERO_AHEAD_BYTES

pytestmark = pytest.mark.unit


class RecordingFileIO(OsFileIO):
    """The real file layer, remembering every pwrite as (offset, length)."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def pwrite(self, handle: int, data: bytes, offset: int) -> None:
        self.writes.append((offset, len(data)))
        super().pwrite(handle, data, offset)

    def write_synced(self, handle: int, data: bytes, offset: int) -> None:
        self.writes.append((offset, len(data)))
        super().write_synced(handle, data, offset)


def test_zeros_ahead_once_per_region_and_tail_stays_zero(tmp_path: Path) -> None:
    io = RecordingFileIO()
    payload = b"r" * 1000  # 1016 bytes framed
    segment_bytes = 4 << 20
    with PersistentQueue.open(tmp_path, capacity_bytes=16 << 20, segment_bytes=segment_bytes,
                              persist="fdatasync", file_io=io) as queue:
        for _ in range(600):  # ~600 KiB of records: crosses two zero-ahead regions
            queue.append([payload])
        record_writes = [w for w in io.writes if w[0] >= 4096 or w[1] != 32]
        padded = [w for w in record_writes if w[1] > 1016]
        # Most writes carry only their record; a few carry a zero-ahead region with it.
        assert 2 <= len(padded) <= 4, padded
        assert all(length <= 1016 + ZERO_AHEAD_BYTES for _, length in padded)
        segment = sorted(tmp_path.glob("*.seg"))[-1]
        tail = queue.depth().bytes + 32  # records + the segment header
        data = segment.read_bytes()
        assert data[tail:].count(0) == len(data) - tail  # past the tail: zeros only
    with PersistentQueue.open(tmp_path, capacity_bytes=16 << 20, segment_bytes=segment_bytes,
                              persist="fdatasync") as queue:
        records = queue.read(1, max_records=1000)
        assert [r.seq for r in records] == list(range(1, 601))
        assert all(r.payload == payload for r in records)
