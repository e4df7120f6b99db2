"""Reads size their pread window from the records seen last; any size mix reads the same.

The window is a guess (the average framed size of the previous read times the records
asked for): a guess too small must only cost more preads, never change what a read returns.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe.queue import PersistentQueue

pytestmark = pytest.mark.unit

SIZES = st.one_of(st.integers(0, 60), st.integers(3000, 9000), st.integers(60_000, 140_000))


def _expected(payloads: list[bytes], start: int, max_records: int,
              max_bytes: int) -> list[tuple[int, bytes]]:
    """The read contract: from ``start`` in order, at least one, then within both limits."""
    taken: list[tuple[int, bytes]] = []
    total = 0
    for seq in range(start, len(payloads) + 1):
        payload = payloads[seq - 1]
        if len(taken) >= max_records or (taken and total + len(payload) > max_bytes):
            break
        taken.append((seq, payload))
        total += len(payload)
    return taken


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(SIZES, min_size=1, max_size=40),
       reads=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 50),
                                st.sampled_from([0, 100, 10_000, 200_000, 4 << 20])),
                      min_size=1, max_size=12))
def test_reads_return_the_contract_whatever_the_sizes(
        sizes: list[int], reads: list[tuple[int, int, int]]) -> None:
    payloads = [bytes([i % 251]) * size for i, size in enumerate(sizes)]
    # Small segments: windows also end at segment boundaries.
    with tempfile.TemporaryDirectory() as scratch, \
            PersistentQueue.open(Path(scratch) / "q", capacity_bytes=16 << 20,
                                 segment_bytes=256 << 10) as queue:
        for index in range(0, len(payloads), 7):
            queue.append(payloads[index:index + 7])
        for start, max_records, max_bytes in reads:
            start = min(start, len(payloads))
            got = queue.read(start, max_records=max_records, max_bytes=max_bytes)
            assert [(r.seq, r.payload) for r in got] == \
                _expected(payloads, start, max_records, max_bytes)


def test_many_small_records_then_one_large(tmp_path: Path) -> None:
    # The window learned from 16-byte records is far too small for the large one.
    small = [b"s" * 16] * 300
    large = b"L" * 50_000
    with PersistentQueue.open(tmp_path / "q", capacity_bytes=4 << 20) as queue:
        queue.append(small)
        queue.append([large, b"after"])
        assert [r.payload for r in queue.read(1, max_records=300)] == small
        assert [(r.seq, r.payload) for r in queue.read(301, max_records=2)] == \
            [(301, large), (302, b"after")]
        assert [r.payload for r in queue.read(290, max_records=1000)] == \
            [*small[289:], large, b"after"]
