"""Appends driven by one owner: ``append_nowait`` places, ``start_write`` writes a group on
the calling thread or in the background (the C ``SyncWorker``, a thread that never takes the
GIL), ``poll_durable`` settles it. Nothing is readable or reported durable before its sync."""

from __future__ import annotations

import errno
import os
import select
from pathlib import Path

import pytest
from support.cmodules import c_module

from iotpipe.queue import PersistentQueue, QueueError, QueueFull, fileio

pytestmark = pytest.mark.unit

OPEN_ARGS = {"capacity_bytes": 1 << 20, "segment_bytes": 64 << 10, "consumers": ["c"]}


def wait_readable(fd: int, timeout: float = 10.0) -> None:
    readable, _, _ = select.select([fd], [], [], timeout)
    assert readable == [fd], f"descriptor {fd} did not poll readable within {timeout} s"


def payloads(tag: str, n: int, size: int = 100) -> list[bytes]:
    return [f"{tag}{i}:".encode().ljust(size, b".") for i in range(n)]


# -- the C worker ------------------------------------------------------------------------


def test_sync_worker_writes_syncs_then_signals(tmp_path: Path) -> None:
    worker = c_module("iotpipe.queue._framing").SyncWorker()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        big = os.urandom(3 << 20)  # more than one pwrite may take
        worker.submit(fd, [big], 10)
        with pytest.raises(RuntimeError, match="outstanding"):
            worker.submit(fd, [b"x"], 0)  # one write at a time
        wait_readable(worker.fileno())
        assert worker.done()
        worker.collect()
        assert not worker.done()
        assert os.pread(fd, len(big) + 10, 0) == bytes(10) + big
        with pytest.raises(RuntimeError, match="no write"):
            worker.collect()
        # The eventfd was reset by collect: it polls readable again only after the next.
        assert select.select([worker.fileno()], [], [], 0)[0] == []
        worker.submit(fd, [bytearray(b"ag"), memoryview(b"--ain")[2:]], 0)
        worker.collect()  # waits when it has not finished
        assert os.pread(fd, 5, 0) == b"again"
    finally:
        worker.close()
        os.close(fd)
    worker.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        worker.submit(0, [b"x"], 0)


def test_sync_worker_writes_many_parts_in_order(tmp_path: Path) -> None:
    """More parts than one pwritev takes (IOV_MAX), of every size, empty ones included."""
    worker = c_module("iotpipe.queue._framing").SyncWorker()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        parts = [os.urandom(i % 97) for i in range(3000)] + [os.urandom(1 << 20)]
        worker.submit(fd, tuple(parts), 4096)
        worker.collect()
        expected = b"".join(parts)
        assert os.pread(fd, len(expected) + 1, 4096) == expected
    finally:
        worker.close()
        os.close(fd)
    with pytest.raises(TypeError, match="list or tuple"):
        c_module("iotpipe.queue._framing").SyncWorker().submit(0, b"bytes", 0)


def test_sync_worker_reports_the_failure_at_collect() -> None:
    framing = c_module("iotpipe.queue._framing")
    worker = framing.SyncWorker()
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    try:
        worker.submit(write_end, [b"x"], 0)  # a closed descriptor
        with pytest.raises(OSError) as caught:
            worker.collect()
        assert caught.value.errno == errno.EBADF
        with pytest.raises(ValueError, match="offset"):
            worker.submit(0, [b"x"], -1)
        with pytest.raises(TypeError):
            worker.submit(0, ["text"], 0)
        assert not worker.done()  # a refused submit leaves nothing outstanding
    finally:
        worker.close()


def test_sync_worker_close_waits_for_a_write_in_flight(tmp_path: Path) -> None:
    worker = c_module("iotpipe.queue._framing").SyncWorker()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        data = os.urandom(8 << 20)
        worker.submit(fd, [data], 0)
        worker.close()
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)


def test_the_real_file_layer_gets_the_c_worker_and_any_other_writes_through_itself() -> None:
    framing = c_module("iotpipe.queue._framing")
    real = fileio.sync_worker_for(fileio.OsFileIO())
    assert isinstance(real, framing.SyncWorker)
    real.close()

    calls: list[tuple[int, bytes, int]] = []

    class Recording(fileio.OsFileIO):
        def write_synced(self, handle: int, data: bytes, offset: int) -> None:
            calls.append((handle, bytes(data), offset))

    inline = fileio.sync_worker_for(Recording())
    try:
        assert isinstance(inline, fileio.InlineSyncWorker)
        inline.submit(7, [b"ab", memoryview(b"c")], 3)
        wait_readable(inline.fileno())
        assert inline.done()
        inline.collect()
        assert calls == [(7, b"abc", 3)]
    finally:
        inline.close()


# -- the queue ---------------------------------------------------------------------------


@pytest.mark.parametrize("background", [False, True])
def test_placed_records_are_durable_and_readable_only_after_their_write(
        tmp_path: Path, background: bool) -> None:
    queue = PersistentQueue.open(tmp_path / "q", **OPEN_ARGS)
    try:
        placed = queue.append_nowait(payloads("a", 5))
        assert placed == range(1, 6)
        assert queue.poll_durable() == 0 and queue.durable_seq == 0
        assert queue.read(1) == []
        assert queue.start_write(background=background)
        if background:
            wait_readable(queue.durable_fileno())
        assert queue.poll_durable() == 5
        assert [r.payload for r in queue.read(1, max_records=10)] == payloads("a", 5)
        assert not queue.start_write(background=background)  # nothing placed: no write
    finally:
        queue.close()


def test_batches_placed_during_a_background_write_form_the_next_group(tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", **OPEN_ARGS)
    try:
        queue.append_nowait(payloads("a", 3))
        assert queue.start_write(background=True)
        assert queue.writing
        queue.append_nowait(payloads("b", 2))
        queue.append_nowait(payloads("c", 2))
        assert not queue.start_write(background=True)  # one write at a time
        assert queue.poll_durable(wait=True) == 3  # the first group only
        assert not queue.writing
        assert queue.start_write(background=False)  # b and c: one group, durable on return
        assert queue.poll_durable() == 7
        assert [r.payload for r in queue.read(1, max_records=10)] == (
            payloads("a", 3) + payloads("b", 2) + payloads("c", 2))
    finally:
        queue.close()


def test_a_background_group_is_the_same_bytes_on_disk_as_an_inline_one(tmp_path: Path
                                                                        ) -> None:
    """Several placed batches written as parts (their first records' FIRST_IN_WRITE flags
    cleared, the zeros ahead appended) equal the joined write of the blocking path."""
    files = []
    for background in (False, True):
        path = tmp_path / f"q-{background}"
        queue = PersistentQueue.open(path, **OPEN_ARGS)
        try:
            for tag in "abcd":
                queue.append_nowait(payloads(tag, 7, size=300))
            queue.start_write(background=background)
            assert queue.poll_durable(wait=True) == 28
        finally:
            queue.close()
        (segment,) = path.glob("*.seg")
        files.append(segment.read_bytes())
    assert files[0] == files[1]


def test_groups_survive_reopen_across_segments(tmp_path: Path) -> None:
    """Groups that start new segments are written in order (the worker takes only writes
    into an existing file); all of them are there after a reopen."""
    path = tmp_path / "q"
    queue = PersistentQueue.open(path, **OPEN_ARGS)
    expected: list[bytes] = []
    try:
        for round_ in range(40):  # about 6 segments of 64 KiB
            batch = payloads(f"r{round_}-", 15, size=1000)
            queue.append_nowait(batch)
            expected += batch
            queue.start_write(background=round_ % 3 != 0)
            queue.poll_durable(wait=round_ % 2 == 0)
        queue.poll_durable(wait=True)
        queue.start_write(background=False)
        assert queue.poll_durable() == len(expected)
    finally:
        queue.close()
    queue = PersistentQueue.open(path, **OPEN_ARGS)
    try:
        assert queue.next_seq == len(expected) + 1
        records = queue.read(1, max_records=10_000, max_bytes=1 << 30)
        assert [r.payload for r in records] == expected
    finally:
        queue.close()


def test_a_group_that_starts_a_segment_is_settled_before_start_write_returns(
        tmp_path: Path) -> None:
    """No descriptor signals a write made on the caller's thread: it must not look busy."""
    queue = PersistentQueue.open(tmp_path / "q", **OPEN_ARGS)
    try:
        queue.append_nowait(payloads("a", 70, size=1000))  # more than one 64 KiB segment
        assert queue.start_write(background=True)
        assert not queue.writing
        assert queue.poll_durable() == 70
    finally:
        queue.close()


def test_a_full_log_refuses_at_once_and_places_nothing(tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=256 << 10,
                                 segment_bytes=64 << 10, consumers=["c"])
    try:
        placed = 0
        with pytest.raises(QueueFull):
            for _ in range(1000):
                placed = queue.append_nowait(payloads("x", 10, size=1000))[-1]
                queue.start_write(background=False)
        assert queue.next_seq == placed + 1
        queue.start_write(background=False)
        assert queue.poll_durable() == placed
    finally:
        queue.close()


class FailingWrites(fileio.OsFileIO):
    def write_synced(self, handle: int, data: bytes, offset: int) -> None:
        raise OSError(errno.EIO, "simulated write error")


@pytest.mark.parametrize("background", [False, True])
def test_a_failed_write_fails_the_queue_and_nothing_becomes_durable(
        tmp_path: Path, background: bool) -> None:
    queue = PersistentQueue.open(tmp_path / "q", file_io=FailingWrites(), **OPEN_ARGS)
    try:
        queue.append_nowait(payloads("a", 3))
        with pytest.raises(QueueError, match="write failed"):
            queue.start_write(background=background)
            queue.poll_durable(wait=True)
        assert queue.durable_seq == 0
        with pytest.raises(QueueError):
            queue.append_nowait(payloads("b", 1))
    finally:
        queue.close()


def test_the_two_kinds_of_append_are_not_mixed(tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", **OPEN_ARGS)
    try:
        queue.append_nowait(payloads("a", 3))
        queue.start_write(background=True)
        with pytest.raises(RuntimeError, match="one kind of append"):
            queue.append(payloads("b", 1))
        assert queue.poll_durable(wait=True) == 3
    finally:
        queue.close()


def test_close_finishes_a_background_write(tmp_path: Path) -> None:
    path = tmp_path / "q"
    queue = PersistentQueue.open(path, **OPEN_ARGS)
    queue.append_nowait(payloads("a", 4))
    queue.start_write(background=True)
    queue.close()
    queue = PersistentQueue.open(path, **OPEN_ARGS)
    try:
        assert [r.payload for r in queue.read(1, max_records=10)] == payloads("a", 4)
    finally:
        queue.close()
