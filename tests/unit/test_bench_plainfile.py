"""``PlainFile``, the baselines' plain durable write: a ring of pwrite + fdatasync."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from iotpipe_tools.bench.plainfile import PlainFile

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("written", [False, True])
def test_appends_fill_the_ring_then_start_over(tmp_path: Path, written: bool) -> None:
    ring = PlainFile(tmp_path / "ring.bin", written=written, size=10_000)
    try:
        assert os.path.getsize(ring.path) == 10_000  # preallocated: no size change per sync
        ring.append(b"a" * 4_000)
        ring.append(b"b" * 4_000)
        ring.append(b"c" * 4_000)  # does not fit after 8,000: written from the start
        data = ring.path.read_bytes()
        assert data[:4_000] == b"c" * 4_000 and data[4_000:8_000] == b"b" * 4_000
        assert data[8_000:] == bytes(2_000)
        assert ring.offset == 4_000
    finally:
        ring.close()
    assert not ring.path.exists()


def test_a_write_larger_than_the_ring_is_refused(tmp_path: Path) -> None:
    ring = PlainFile(tmp_path / "ring.bin", size=4_096)
    try:
        with pytest.raises(ValueError, match="do not fit a ring of 4096"):
            ring.append(b"x" * 4_097)
        assert ring.offset == 0
    finally:
        ring.close()
