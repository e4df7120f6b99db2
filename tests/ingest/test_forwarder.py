"""The forwarder's I/O shell on an event loop: what runs where, cursors, errors, stopping.

The protocol rules (windows, busy, failover, moves) are ForwarderCore's and tested in
test_forwarder_core.py; the whole ingest process in test_server.py and test_pod.py.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.ingest import FakeMiddle

from iotpipe.ingest import forwarder as forwarder_module
from iotpipe.ingest.forwarder import CONSUMER, Forwarder
from iotpipe.queue import AsyncQueue, PersistentQueue, QueueCorrupted
from iotpipe.wire import encode_reading


def reading(i: int) -> bytes:
    return encode_reading("dev", str(i), i, b'{"v":1}', i)


@pytest.fixture
def middle() -> Iterator[FakeMiddle]:
    fake = FakeMiddle()
    yield fake
    fake.close()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[PersistentQueue]:
    q = PersistentQueue.open(tmp_path / "q", consumers=(CONSUMER,))
    yield q
    q.close()


class ReadThreads:
    """Wraps ``queue.read``: the thread of each call and the first seq it asked for."""

    def __init__(self, queue: PersistentQueue) -> None:
        self.calls: list[tuple[int, int]] = []
        self._read = queue.read

    def __call__(self, from_seq: int, **kwargs: Any) -> Any:
        self.calls.append((threading.get_ident(), from_seq))
        return self._read(from_seq, **kwargs)


async def test_on_the_loop_no_thread_of_its_own_and_acks_move_the_cursor(
        queue: PersistentQueue, middle: FakeMiddle) -> None:
    aqueue = AsyncQueue(queue)
    before = {t.name for t in threading.enumerate()}
    fwd = Forwarder(queue, "node-a", [middle.endpoint], batch_records=8,
                    cursor_interval=0.01).start(asyncio.get_running_loop())
    try:
        for i in range(1, 41):
            await aqueue.append([reading(i)])
        assert await middle.until(lambda m: len(m.stored) == 40, 10)
        # The cursor follows the middle's acks (written by the disk thread, on a timer).
        for _ in range(200):
            if queue.acked(CONSUMER) == 40:
                break
            await asyncio.sleep(0.01)
        assert queue.acked(CONSUMER) == 40
        assert fwd.is_empty() and fwd.error is None
        assert sorted(seq for _, seq in middle.stored) == list(range(1, 41))
        # It runs on the caller's loop: the one thread it added writes the cursor.
        added = {t.name for t in threading.enumerate()} - before
        assert added <= {"forwarder-disk-node-a_0"}, added
    finally:
        await fwd.aclose()
        await aqueue.aclose()


async def test_a_backlog_is_read_off_the_loop_and_the_head_on_it(
        queue: PersistentQueue, middle: FakeMiddle, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forwarder_module, "_INLINE_READ_BATCHES", 2)
    queue.append([reading(i) for i in (1, 2, 3)])  # before the start: maybe not cached
    reads = ReadThreads(queue)
    monkeypatch.setattr(queue, "read", reads)
    loop_thread = threading.get_ident()
    fwd = Forwarder(queue, "node-b", [middle.endpoint], batch_records=4,
                    window=2).start(asyncio.get_running_loop())
    try:
        assert await middle.until(lambda m: len(m.stored) == 3, 10)
        # 40 more at once: far behind the head (2 batches of 4 is the limit) at first.
        queue.append([reading(i) for i in range(4, 44)])
        assert await middle.until(lambda m: len(m.stored) == 43, 10)
        aqueue = AsyncQueue(queue)
        try:
            for i in range(44, 52):
                await aqueue.append([reading(i)])
            assert await middle.until(lambda m: len(m.stored) == 51, 10)
        finally:
            await aqueue.aclose()
    finally:
        await fwd.aclose()
    assert fwd.error is None
    by_seq = {seq: thread for thread, seq in reads.calls}
    assert by_seq[1] != loop_thread, "written before the start: read by the disk thread"
    far = [thread for seq, thread in by_seq.items() if seq >= 4 and 43 - seq >= 8]
    assert far and loop_thread not in far, "more than 8 behind the head: the disk thread"
    near = [thread for seq, thread in by_seq.items() if seq >= 44]
    assert near and set(near) == {loop_thread}, "just made durable: read on the loop"
    assert sorted(seq for _, seq in middle.stored) == list(range(1, 52))


async def test_the_cursor_is_written_off_the_loop_and_once_more_on_close(
        queue: PersistentQueue, middle: FakeMiddle, monkeypatch: pytest.MonkeyPatch) -> None:
    writers: list[int] = []
    ack = queue.ack

    def recording_ack(consumer: str, seq: int) -> None:
        writers.append(threading.get_ident())
        ack(consumer, seq)

    monkeypatch.setattr(queue, "ack", recording_ack)
    queue.append([reading(i) for i in range(1, 11)])
    # The first cursor write is due at once, the next only after the test.
    fwd = Forwarder(queue, "node-c", [middle.endpoint],
                    cursor_interval=3600).start(asyncio.get_running_loop())
    try:
        for _ in range(500):
            if queue.acked(CONSUMER) == 10:
                break
            await asyncio.sleep(0.01)
        assert queue.acked(CONSUMER) == 10
        queue.append([reading(i) for i in range(11, 21)])
        assert await middle.until(lambda m: len(m.stored) == 20, 10)
        for _ in range(500):
            if fwd.core.acked_through == 20:
                break
            await asyncio.sleep(0.01)
        assert fwd.core.acked_through == 20
        assert queue.acked(CONSUMER) == 10, "not due before the close"
    finally:
        await fwd.aclose()
    assert queue.acked(CONSUMER) == 20
    assert writers and threading.get_ident() not in writers


async def test_a_failed_read_stops_it_and_says_why(
        queue: PersistentQueue, middle: FakeMiddle, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_read(from_seq: int, **kwargs: Any) -> Any:
        raise QueueCorrupted(Path("segment"), 0, "test damage")

    monkeypatch.setattr(queue, "read", broken_read)
    fwd = Forwarder(queue, "node-d", [middle.endpoint]).start(asyncio.get_running_loop())
    try:
        queue.append([reading(1)])  # a synchronous commit: its listener wakes the forwarder
        for _ in range(200):
            if fwd.error is not None:
                break
            await asyncio.sleep(0.01)
        assert isinstance(fwd.error, QueueCorrupted)
        assert not await asyncio.to_thread(fwd.wait_empty, 0.5)
        assert not middle.batches
    finally:
        await fwd.aclose()


def test_with_a_loop_of_its_own_in_a_thread(queue: PersistentQueue,
                                            middle: FakeMiddle) -> None:
    queue.append([reading(i) for i in range(1, 21)])
    fwd = Forwarder(queue, "node-e", [middle.endpoint], batch_records=8).start()
    try:
        assert fwd.wait_empty(10)
        with pytest.raises(RuntimeError, match="already started"):
            fwd.start()
    finally:
        fwd.stop()
    assert not any(t.name == "forwarder-node-e" for t in threading.enumerate())
    assert queue.acked(CONSUMER) == 20
    fwd.stop()  # twice: nothing left to do


async def test_stop_from_another_thread_and_endpoints_from_any(
        queue: PersistentQueue, middle: FakeMiddle) -> None:
    other = FakeMiddle()
    try:
        fwd = Forwarder(queue, "node-f", [middle.endpoint]).start(asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="await aclose"):
            fwd.stop()
        # A new list from another thread (a drain's reload): every record goes to the
        # only endpoint left.
        await asyncio.to_thread(fwd.set_endpoints, [other.endpoint])
        queue.append([reading(i) for i in range(1, 6)])
        assert await other.until(lambda m: len(m.stored) == 5, 10)
        assert fwd.endpoints == [other.endpoint]
        await asyncio.to_thread(fwd.stop)
        assert queue.acked(CONSUMER) == 5
    finally:
        other.close()
