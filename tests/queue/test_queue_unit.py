"""Unit tests of PersistentQueue and AsyncQueue on real files."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.simfs import SimFS

from iotpipe.queue import (
    AsyncQueue,
    Depth,
    PersistentQueue,
    QueueClosed,
    QueueCorrupted,
    QueueError,
    QueueFull,
    QueueLocked,
    Record,
)
from iotpipe.queue.fileio import OsFileIO

pytestmark = pytest.mark.unit

# test_queue_pmem.py runs this module again with PMEM_IS_PMEM_FORCE=1 (pmem backend).
EXPECTED_PERSIST = os.environ.get("IOTPIPE_QUEUE_EXPECT_PERSIST", "fdatasync")


def payload_for(seq: int) -> bytes:
    return f"payload-{seq}-".encode() * (seq % 7 + 1)


def segment_files(path: Path) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.endswith(".seg"))


def test_append_assigns_consecutive_seqs_from_one_and_reads_them_back(tmp_path: Path) -> None:
    with PersistentQueue.open(tmp_path / "q") as queue:
        assert (queue.first_seq, queue.next_seq) == (1, 1)
        assert queue.append([b"a", b"bb"]) == range(1, 3)
        assert queue.append([b""]) == range(3, 4)
        assert queue.append([]) == range(4, 4)
        assert queue.next_seq == 4
        assert queue.read(1) == [Record(1, b"a"), Record(2, b"bb"), Record(3, b"")]
        assert queue.read(3) == [Record(3, b"")]
        assert queue.read(4) == []
        assert queue.read(-5, max_records=1) == [Record(1, b"a")]
        assert queue.persist_mode == EXPECTED_PERSIST
    with PersistentQueue.open(tmp_path / "q2", persist="fdatasync") as queue:
        assert queue.persist_mode == "fdatasync"  # forcing fdatasync always works


def test_reopen_keeps_records_cursors_and_seqs(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with PersistentQueue.open(path, consumers=["storage"]) as queue:
        queue.append([payload_for(s) for s in range(1, 51)])
        queue.ack("storage", 20)
    with PersistentQueue.open(path, consumers=["storage", "relay"]) as queue:
        assert queue.next_seq == 51
        assert queue.acked("storage") == 20
        assert queue.acked("relay") == 0  # new consumers start at the oldest retained
        assert queue.consumers == ["relay", "storage"]
        records = queue.read(1, max_records=100)
        assert [r.seq for r in records] == list(range(1, 51))
        assert all(r.payload == payload_for(r.seq) for r in records)
        assert queue.append([b"next"]) == range(51, 52)


def test_read_limits_records_and_bytes_but_returns_at_least_one(tmp_path: Path) -> None:
    with PersistentQueue.open(tmp_path / "q") as queue:
        queue.append([b"x" * 100] * 10)
        assert len(queue.read(1, max_records=3)) == 3
        assert len(queue.read(1, max_bytes=250)) == 2
        assert len(queue.read(1, max_bytes=10)) == 1  # one record even past max_bytes
        with pytest.raises(ValueError, match="max_records"):
            queue.read(1, max_records=0)


def test_records_span_segments_and_acked_segments_are_deleted(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with PersistentQueue.open(path, capacity_bytes=64 << 10, segment_bytes=8192,
                              consumers=["c"]) as queue:
        seqs = queue.append([payload_for(s) for s in range(1, 301)])
        assert seqs == range(1, 301)
        assert len(segment_files(path)) > 1
        records = queue.read(1, max_records=1000, max_bytes=1 << 30)
        assert [r.payload for r in records] == [payload_for(s) for s in range(1, 301)]
        before = len(segment_files(path))
        queue.ack("c", 300)
        after = segment_files(path)
        assert len(after) == 1 < before  # the last (active) segment stays
        assert queue.first_seq == int(after[0].split(".")[0])
        assert queue.depth() == Depth(0, 0)
    with PersistentQueue.open(path, capacity_bytes=64 << 10, segment_bytes=8192) as queue:
        assert queue.next_seq == 301
        assert queue.read(0)[0].seq == queue.first_seq


def test_a_payload_run_is_stored_like_the_list_of_its_payloads(tmp_path: Path) -> None:
    """Payloads held in one buffer (the middle's log records) append as a list of them does,
    also when they span segments and when only a slice of the run is appended."""
    from iotpipe.queue.framing import PayloadRun

    payloads = [payload_for(s) for s in range(1, 301)]
    data = b"".join(payloads)
    bounds: list[int] = []
    for payload in payloads:
        start = bounds[-1] if bounds else 0
        bounds += [start, start + len(payload)]
    run = PayloadRun(data, bounds)
    with PersistentQueue.open(tmp_path / "q", capacity_bytes=64 << 10, segment_bytes=8192
                              ) as queue:
        assert queue.append(run[:250]) == range(1, 251)
        assert len(segment_files(tmp_path / "q")) > 1
        assert queue.append_nowait(run[250:]) == range(251, 301)
        queue.start_write(background=False)
        assert queue.poll_durable() == 300
        records = queue.read(1, max_records=1000, max_bytes=1 << 30)
        assert [r.payload for r in records] == payloads


def test_depth_counts_unacked_records_and_their_bytes(tmp_path: Path) -> None:
    with PersistentQueue.open(tmp_path / "q") as queue:
        queue.append([b"x" * 16] * 4)  # 16 header + 16 payload = 32 bytes each
        assert queue.depth() == Depth(4, 128)  # no consumer: everything retained
        queue.register_consumer("a")
        queue.register_consumer("b")
        queue.ack("a", 3)
        assert queue.depth() == Depth(4, 128)  # the slowest consumer counts
        queue.ack("b", 1)
        assert queue.depth() == Depth(3, 96)
        queue.unregister_consumer("b")
        assert queue.depth() == Depth(1, 32)


def test_ack_is_cumulative_and_checked(tmp_path: Path) -> None:
    with PersistentQueue.open(tmp_path / "q", consumers=["c"]) as queue:
        queue.append([b"a", b"b", b"c"])
        queue.ack("c", 2)
        queue.ack("c", 1)  # older ack: already covered
        assert queue.acked("c") == 2
        with pytest.raises(ValueError, match="last durable record is 3"):
            queue.ack("c", 4)
        with pytest.raises(KeyError, match="unknown consumer"):
            queue.ack("nobody", 1)
        with pytest.raises(ValueError, match="consumer name"):
            queue.register_consumer("")


def test_full_queue_raises_at_once_or_after_a_bounded_wait(tmp_path: Path) -> None:
    with PersistentQueue.open(tmp_path / "q", capacity_bytes=16384, segment_bytes=8192,
                              consumers=["c"]) as queue:
        record = b"r" * 1000  # 1016 framed: 8 records per 8 KiB segment
        appended = queue.append([record] * 10)
        with pytest.raises(QueueFull, match="full"):
            queue.append([record] * 8)
        start = time.monotonic()
        with pytest.raises(QueueFull):
            queue.append([record] * 8, timeout=0.2)
        assert time.monotonic() - start >= 0.2
        assert queue.next_seq == appended.stop  # nothing of a refused batch was stored

        def ack_later() -> None:
            time.sleep(0.1)
            queue.ack("c", appended.stop - 1)

        thread = threading.Thread(target=ack_later)
        thread.start()
        assert len(queue.append([record] * 8, timeout=5)) == 8
        thread.join(5)


def test_oversized_record_and_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="persist"):
        PersistentQueue.open(tmp_path / "q", persist="mmap")
    with pytest.raises(ValueError, match="capacity_bytes"):
        PersistentQueue.open(tmp_path / "q", capacity_bytes=100)
    with PersistentQueue.open(tmp_path / "q", capacity_bytes=32768) as queue:
        assert queue.segment_bytes == 16384  # capped to half the capacity
        with pytest.raises(ValueError, match="does not fit in a segment"):
            queue.append([b"x" * 20000])
        with pytest.raises(TypeError, match="sequence of payloads"):
            queue.append(b"abc")
        with pytest.raises(TypeError, match="bytes"):
            queue.append(["text"])  # type: ignore[list-item]


def test_second_process_gets_queue_locked(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with PersistentQueue.open(path):
        code = ("import sys\nfrom iotpipe.queue import PersistentQueue, QueueLocked\n"
                "try:\n    PersistentQueue.open(sys.argv[1])\n"
                "except QueueLocked as exc:\n    print(exc); sys.exit(3)\n")
        result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 3, result.stderr
        assert "already open" in result.stdout and str(os.getpid()) in result.stdout
        with pytest.raises(QueueLocked):
            PersistentQueue.open(path)
    with PersistentQueue.open(path):  # released on close
        pass


def test_closed_queue_refuses_use(tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q")
    queue.close()
    queue.close()
    with pytest.raises(QueueClosed):
        queue.append([b"x"])
    with pytest.raises(QueueClosed):
        queue.read(1)


def test_wait_wakes_on_a_durable_append(tmp_path: Path) -> None:
    with PersistentQueue.open(tmp_path / "q") as queue:
        assert queue.wait(0, timeout=0.05) is False
        timer = threading.Timer(0.05, queue.append, args=([b"x"],))
        timer.start()
        assert queue.wait(0, timeout=5) is True
        timer.join()
        assert queue.wait(0, timeout=0) is True


def test_concurrent_appenders_get_disjoint_ranges_and_share_syncs(tmp_path: Path) -> None:
    syncs = 0
    with PersistentQueue.open(tmp_path / "q", capacity_bytes=64 << 20,
                              segment_bytes=1 << 20) as queue:
        original = os.fdatasync

        def counting_fdatasync(fd: int) -> None:
            nonlocal syncs
            syncs += 1
            time.sleep(0.001)  # a slow disk makes followers pile up behind the leader
            original(fd)

        results: list[tuple[int, range]] = []
        lock = threading.Lock()

        def worker(number: int) -> None:
            for index in range(50):
                seqs = queue.append([f"{number}:{index}".encode()] * 3)
                with lock:
                    results.append((number, seqs))

        os.fdatasync = counting_fdatasync  # type: ignore[assignment]
        try:
            threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        finally:
            os.fdatasync = original
        assert len(results) == 400
        seen = sorted(seq for _, seqs in results for seq in seqs)
        assert seen == list(range(1, 1201))
        assert syncs < 400  # group commit: followers rode on leaders' syncs
        records = queue.read(1, max_records=2000)
        by_seq = {r.seq: r.payload for r in records}
        for number, seqs in results:
            assert {by_seq[s] for s in seqs} == {by_seq[seqs[0]]}
            assert by_seq[seqs[0]].startswith(f"{number}:".encode())


async def test_async_queue_groups_concurrent_appends(tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=1 << 20, segment_bytes=65536)
    async_queue = AsyncQueue(queue)
    ranges = await asyncio.gather(*(async_queue.append([f"m{i}".encode()]) for i in range(200)))
    assert sorted(r.start for r in ranges) == list(range(1, 201))
    assert all(len(r) == 1 for r in ranges)
    records = queue.read(1, max_records=500)
    assert {r.payload for r in records} == {f"m{i}".encode() for i in range(200)}
    for r in ranges:
        assert queue.read(r.start, max_records=1)[0].payload in {rec.payload for rec in records}
    waiter = asyncio.ensure_future(async_queue.wait(200, timeout=5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await async_queue.append([b"wake"])
    assert await waiter is True
    assert await async_queue.wait(10_000, timeout=0.05) is False
    with pytest.raises(TypeError):
        await async_queue.append(b"not a list")
    await async_queue.aclose()
    with pytest.raises(QueueClosed):
        queue.read(1)


async def test_async_queue_full_waits_then_fails_per_caller(tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=16384, segment_bytes=8192,
                                 consumers=["c"])
    async_queue = AsyncQueue(queue)
    try:
        record = b"r" * 1000
        first = await async_queue.append([record] * 10)
        results = await asyncio.gather(async_queue.append([record] * 8),
                                       async_queue.append([b"small"]),
                                       return_exceptions=True)
        assert isinstance(results[0], QueueFull)
        assert isinstance(results[1], range)
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, queue.ack, "c", results[1].stop - 1)
        assert len(await async_queue.append([record] * 8, timeout=5)) == 8
        assert first.start == 1
    finally:
        await async_queue.aclose()


async def test_async_queue_bad_batch_fails_alone(tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=1 << 20, segment_bytes=65536)
    async_queue = AsyncQueue(queue)
    try:
        results = await asyncio.gather(async_queue.append([b"a", b"b"]),
                                       async_queue.append(["text"]),  # type: ignore[list-item]
                                       async_queue.append([b"x" * 70000]),
                                       async_queue.append([]),
                                       async_queue.append([b"c"]),
                                       return_exceptions=True)
        assert isinstance(results[1], TypeError)
        assert isinstance(results[2], ValueError)
        good = [r for r in results if isinstance(r, range)]
        assert sorted(seq for r in good for seq in r) == [1, 2, 3]
        assert [r.payload for r in queue.read(1)] == [b"a", b"b", b"c"]
    finally:
        await async_queue.aclose()


def test_records_in_older_segments_are_read_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with PersistentQueue.open(path, capacity_bytes=1 << 20, segment_bytes=8192) as queue:
        for start in range(1, 1001, 50):
            queue.append([payload_for(s) for s in range(start, start + 50)])
        depth = queue.depth()
    assert len(segment_files(path)) > 5
    with PersistentQueue.open(path, capacity_bytes=1 << 20, segment_bytes=8192) as queue:
        assert queue.depth() == depth  # from the segment headers, without scanning
        assert not any(s.scanned for s in queue._state.segments[:-1])
        assert depth.records == 1000
        for start in (1, 333, 777, 1000):
            records = queue.read(start, max_records=10)
            assert [r.seq for r in records] == list(range(start, min(start + 10, 1001)))
            assert all(r.payload == payload_for(r.seq) for r in records)
        everything = queue.read(1, max_records=5000, max_bytes=1 << 30)
        assert [r.payload for r in everything] == [payload_for(s) for s in range(1, 1001)]
    with PersistentQueue.open(path, capacity_bytes=1 << 20, segment_bytes=8192) as queue:
        seq, seen = 1, []
        while seq <= 1000:  # a sequential reader walks segment to segment without scans
            seen += queue.read(seq, max_records=37)
            seq = seen[-1].seq + 1
        assert [r.payload for r in seen] == [payload_for(s) for s in range(1, 1001)]


def test_missing_or_damaged_files_are_reported_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "q"
    args = {"capacity_bytes": 1 << 20, "segment_bytes": 8192}
    with PersistentQueue.open(path, consumers=["c"], **args) as queue:
        for start in range(1, 601, 50):
            queue.append([payload_for(s) for s in range(start, start + 50)])
    names = segment_files(path)
    # A segment in the middle disappears: reading across the gap fails and says so.
    os.rename(path / names[2], tmp_path / names[2])
    with PersistentQueue.open(path, **args) as queue, \
            pytest.raises(QueueCorrupted, match=rf"{names[1]} .* records up to seq 372"):
        queue.read(1, max_records=1000, max_bytes=1 << 30)
    os.rename(tmp_path / names[2], path / names[2])
    # The first segment disappears while consumer "c" still needs it: the open fails.
    os.rename(path / names[0], tmp_path / names[0])
    with pytest.raises(QueueCorrupted, match="missing"):
        PersistentQueue.open(path, **args)
    os.rename(tmp_path / names[0], path / names[0])
    # A damaged segment header.
    with open(path / names[-1], "r+b") as segment:
        segment.write(b"NOTASEG!")
    with pytest.raises(QueueCorrupted, match=f"{names[-1]} at offset 0: bad segment magic"):
        PersistentQueue.open(path, **args)


def test_ledger_survives_one_torn_slot_but_not_two(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with PersistentQueue.open(path, consumers=["c"]) as queue:
        queue.append([b"x"] * 10)
        queue.ack("c", 4)
        queue.ack("c", 7)  # generation 3: slot 1 holds it, slot 0 holds ack 4
    ledger = path / "cursors.ledger"
    with open(ledger, "r+b") as file:  # tear the newest slot
        file.seek(65536 + 20)
        file.write(b"\xde\xad")
    with PersistentQueue.open(path) as queue:
        assert queue.acked("c") == 4  # the state before the interrupted write
    with open(ledger, "r+b") as file:
        file.seek(20)
        file.write(b"\xde\xad")
    with pytest.raises(QueueCorrupted, match="both ledger slots"):
        PersistentQueue.open(path)


class SlowLedgerFS(SimFS):
    """Holds the ledger's sync until released, to line up a race."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_ledger = False
        self.ledger_entered = threading.Event()
        self.release = threading.Event()

    def fdatasync(self, handle: int) -> None:
        if self.hold_ledger and self._handles[handle].endswith("cursors.ledger"):
            self.ledger_entered.set()
            assert self.release.wait(10)
        super().fdatasync(handle)


def test_registering_a_consumer_holds_back_reclaim_until_it_is_durable() -> None:
    fs = SlowLedgerFS()
    args = {"capacity_bytes": 64 << 10, "segment_bytes": 8192, "file_io": fs}
    queue = PersistentQueue.open("/sim/q", consumers=["a"], **args)
    queue.append([b"x" * 1000] * 8)  # the first segment is now full
    queue.ack("a", 8)
    fs.hold_ledger = True
    registering = threading.Thread(target=queue.register_consumer, args=("b",))
    registering.start()
    assert fs.ledger_entered.wait(10)
    queue.append([b"y" * 1000])  # rolls over to a new segment while "b" is being written
    fs.release.set()
    registering.join(10)
    assert queue.acked("b") == 0
    assert queue.first_seq == 1  # "b" has not read anything yet
    queue.close()
    with PersistentQueue.open("/sim/q", **args) as reopened:
        assert [r.seq for r in reopened.read(0, max_records=100)] == list(range(1, 10))


def test_concurrent_appends_reads_acks_and_reclaim_stay_consistent(tmp_path: Path) -> None:
    """Appenders, a reading+acking consumer and a depth poller race on small segments."""
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=64 << 10, segment_bytes=8192,
                                 consumers=["reader"])
    errors: list[BaseException] = []
    done = threading.Event()
    per_thread = 300

    def appender(number: int) -> None:
        try:
            for index in range(per_thread):
                queue.append([b"%d:%d" % (number, index)], timeout=10)
        except BaseException as exc:
            errors.append(exc)

    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def reader() -> None:
        try:
            seq = 1
            while sum(len(v) for v in seen.values()) < 3 * per_thread:
                records = queue.read(seq, max_records=17)
                if not records:
                    queue.wait(seq - 1, timeout=1)
                    continue
                for record in records:
                    assert record.seq == seq
                    number, index = map(int, record.payload.split(b":"))
                    seen[number].append(index)
                    seq += 1
                queue.ack("reader", seq - 1)
        except BaseException as exc:
            errors.append(exc)

    def poller() -> None:
        try:
            while not done.is_set():
                depth = queue.depth()
                assert depth.records >= 0 and depth.bytes >= 0
                assert queue.first_seq <= queue.acked("reader") + 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=appender, args=(n,)) for n in range(3)]
    threads += [threading.Thread(target=reader), threading.Thread(target=poller)]
    for thread in threads:
        thread.start()
    for thread in threads[:4]:
        thread.join(60)
    done.set()
    threads[4].join(10)
    queue.close()
    assert errors == []
    for number in range(3):  # each appender's records arrive complete and in its order
        assert seen[number] == list(range(per_thread))


async def test_async_queue_submit_joins_the_open_group_as_one_batch(tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=1 << 20, segment_bytes=65536)
    async_queue = AsyncQueue(queue)
    try:
        first = async_queue.submit([b"a"])       # the group starts at the end of this turn:
        second = async_queue.submit([b"b", b"c"])  # the same turn joins it, one batch
        assert second is first
        assert not async_queue._idle.is_set()    # a group is due: not idle
        assert await first == range(1, 4)
        third = async_queue.submit([b"d"])       # a later turn: the next group
        fourth = async_queue.submit([b"e"])
        assert third is fourth and third is not first
        assert await third == range(4, 6)
        assert [r.payload for r in queue.read(1, max_records=10)] == [b"a", b"b", b"c", b"d",
                                                                      b"e"]
        assert await async_queue.wait_idle(5)
    finally:
        await async_queue.aclose()


async def test_async_queue_writes_a_group_in_the_background_while_the_loop_runs(
        tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=1 << 20, segment_bytes=65536)
    async_queue = AsyncQueue(queue)
    try:
        assert await async_queue.submit([b"first"]) == range(1, 2)  # creates the segment
        group = async_queue.submit([b"a", b"b"])
        await asyncio.sleep(0)  # the group started at the end of that turn
        if queue.persist_mode == "fdatasync":
            # On the worker thread: this coroutine runs while it writes; the loop settles
            # the group when the worker's descriptor is readable.
            assert queue.writing and not group.done()
        later = async_queue.submit([b"c"])  # joins the next group, started when this ends
        assert await group == range(2, 4)
        assert await later == range(4, 5)
        assert [r.payload for r in queue.read(1)] == [b"first", b"a", b"b", b"c"]
    finally:
        await async_queue.aclose()


class _FailingWrites(OsFileIO):
    def write_synced(self, handle: int, data: bytes, offset: int) -> None:
        raise OSError(errno.EIO, "simulated write error")


async def test_async_queue_a_failed_write_fails_its_group_and_every_later_one(
        tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=1 << 20, segment_bytes=65536,
                                 file_io=_FailingWrites())
    async_queue = AsyncQueue(queue)
    try:
        first = async_queue.submit([b"a"])
        appended = asyncio.ensure_future(async_queue.append([b"b"]))
        with pytest.raises(QueueError, match="write failed"):
            await first
        with pytest.raises(QueueError):  # its group, or the next: the queue failed
            await appended
        with pytest.raises(QueueError):  # the queue is unusable until reopened
            await async_queue.submit([b"c"])
        assert queue.durable_seq == 0
        assert await async_queue.wait_idle(5)
    finally:
        await async_queue.aclose()


async def test_async_queue_close_fails_what_waits_for_space(tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=16384, segment_bytes=8192,
                                 consumers=["c"])
    async_queue = AsyncQueue(queue)
    record = b"r" * 1000
    await async_queue.append([record] * 10)
    waiting = async_queue.submit([record] * 8, timeout=60)
    await asyncio.sleep(0.05)
    assert not waiting.done() and not async_queue._idle.is_set()
    await async_queue.aclose()
    with pytest.raises(QueueClosed):  # not QueueFull after its 60 s wait
        await waiting


async def test_async_queue_submit_full_fails_the_whole_group_after_its_wait(
        tmp_path: Path) -> None:
    queue = PersistentQueue.open(tmp_path / "q", capacity_bytes=16384, segment_bytes=8192,
                                 consumers=["c"])
    async_queue = AsyncQueue(queue)
    try:
        record = b"r" * 1000
        await async_queue.append([record] * 10)
        started = time.monotonic()
        in_flight = async_queue.submit([b"small"], timeout=0.2)  # fits
        await asyncio.sleep(0)  # its group started: what follows joins the next one
        group = async_queue.submit([record] * 4, timeout=0.2)
        assert group is async_queue.submit([record] * 4, timeout=0.2)  # one batch of 8
        assert await in_flight == range(11, 12)
        with pytest.raises(QueueFull):
            await group
        assert time.monotonic() - started >= 0.15  # it waited for space first
        assert queue.next_seq == 12  # all or nothing: none of the group was stored
        # Space freed while a group waits: it is stored within its wait.
        waiting = async_queue.submit([record] * 8, timeout=5)
        asyncio.get_running_loop().call_later(0.1, queue.ack, "c", 11)
        assert len(await waiting) == 8
    finally:
        await async_queue.aclose()
