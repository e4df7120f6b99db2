"""SIGKILL crash tests on real files.

A forked child appends batches (and acknowledges some as consumer "c") in a loop and
reports each position to the parent over a pipe only after ``append``/``ack`` returned.
The parent SIGKILLs it at a random moment, reopens the queue, and checks that every
reported record is present, intact and in order, and every reported ack kept. Children
are forked from the test process (no interpreter start-up), so hundreds of kills fit in
CI; ``IOTPIPE_CRASH_KILLS`` raises the count locally.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import random
import select
import signal
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from iotpipe.queue import PersistentQueue, QueueCorrupted, QueueFull
from iotpipe.queue.framing import RECORD_HEADER_BYTES, encode_records, framed_size

pytestmark = pytest.mark.crash

# test_queue_pmem.py runs this module again with PMEM_IS_PMEM_FORCE=1 (pmem backend).
EXPECTED_PERSIST = os.environ.get("IOTPIPE_QUEUE_EXPECT_PERSIST", "fdatasync")
KILLS = int(os.environ.get("IOTPIPE_CRASH_KILLS", "200"))
OPEN_ARGS = {"capacity_bytes": 256 << 10, "segment_bytes": 16 << 10}
REPORT = struct.Struct("<cQ")  # b"A" appended through seq, b"K" acked through seq


def payload_for(seq: int) -> bytes:
    return (b"%d:" % seq) * (seq % 29 + 1)


def child_main(path: Path, write_fd: int, seed: int) -> None:
    rng = random.Random(seed)
    queue = PersistentQueue.open(path, consumers=["c"], **OPEN_ARGS)
    assert queue.persist_mode == EXPECTED_PERSIST
    while True:
        first = queue.next_seq
        batch = [payload_for(seq) for seq in range(first, first + rng.randint(1, 40))]
        try:
            seqs = queue.append(batch)
        except QueueFull:
            seqs = None
        if seqs is not None:
            assert seqs.start == first
            os.write(write_fd, REPORT.pack(b"A", seqs.stop - 1))
        lag = rng.randint(0, 300)
        if queue.durable_seq - lag > queue.acked("c") or seqs is None:
            target = max(queue.acked("c"), queue.durable_seq - lag) if seqs else queue.durable_seq
            queue.ack("c", target)
            os.write(write_fd, REPORT.pack(b"K", target))


def fork_and_kill(child: Callable[[int], None], run_for: float) -> bytes:
    """Fork ``child(write_fd)``, let it run ``run_for`` s, SIGKILL it; return what it reported."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 0
        try:
            os.close(read_fd)
            child(write_fd)
        except BaseException:  # reported through the exit status
            import traceback

            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)
    os.close(write_fd)
    buffer = b""
    deadline = time.monotonic() + run_for
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select([read_fd], [], [], remaining)
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break  # the child died on its own: the status check below reports it
                buffer += chunk
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    while chunk := os.read(read_fd, 65536):  # reports written before the kill
        buffer += chunk
    os.close(read_fd)
    assert os.WIFSIGNALED(status), f"child exited by itself (status {status})"
    return buffer


def run_child_until_killed(path: Path, seed: int, run_for: float) -> tuple[int, int]:
    """The single-appender child; returns (last reported append, last reported ack)."""
    buffer = fork_and_kill(lambda write_fd: child_main(path, write_fd, seed), run_for)
    appended = acked = 0
    for kind, seq in REPORT.iter_unpack(buffer[:len(buffer) - len(buffer) % REPORT.size]):
        if kind == b"A":
            appended = max(appended, seq)
        else:
            acked = max(acked, seq)
    return appended, acked


def verify(path: Path, reported_append: int, reported_ack: int) -> PersistentQueue:
    queue = PersistentQueue.open(path, consumers=["c"], **OPEN_ARGS)  # "c": if never opened
    assert queue.next_seq > reported_append, "reported records lost at the tail"
    assert queue.acked("c") >= reported_ack, "a reported ack was lost"
    assert queue.first_seq <= queue.acked("c") + 1, "unacknowledged records were deleted"
    seq = queue.first_seq
    while seq < queue.next_seq:
        records = queue.read(seq, max_records=4096, max_bytes=1 << 30)
        assert records, f"read({seq}) empty below next_seq {queue.next_seq}"
        for record in records:
            assert record.seq == seq, "records out of order or missing"
            assert record.payload == payload_for(seq), f"seq {seq} damaged"
            seq += 1
    return queue


def test_sigkill_at_random_moments_loses_no_reported_record(tmp_path: Path) -> None:
    path = tmp_path / "q"
    rng = random.Random(1234)
    reported_append = reported_ack = 0
    garbage_cut = 0
    for kill in range(KILLS):
        appended, acked = run_child_until_killed(path, seed=kill, run_for=rng.uniform(0, 0.05))
        reported_append = max(reported_append, appended)
        reported_ack = max(reported_ack, acked)
        queue = verify(path, reported_append, reported_ack)
        if kill % 5 == 2:
            # Bytes past the last durable record must be cut: random garbage, or a torn write
            # of real records (a prefix of them: the complete ones may stay, they are valid).
            tail = queue._state.segments[-1]
            tail_path, tail_end, next_seq = tail.path, tail.end, queue.next_seq
            queue.close()
            room = OPEN_ARGS["segment_bytes"] - tail_end
            kept = 0
            if kill % 10 == 2:
                junk = os.urandom(rng.randint(1, 3000))
            else:
                torn = [payload_for(next_seq), payload_for(next_seq + 1)]
                whole = encode_records(torn, next_seq)
                junk = whole[:min(room, rng.randint(1, len(whole) - 1))]
                # Padding is zeros anyway: a record is whole without its padding.
                kept = (len(junk) >= RECORD_HEADER_BYTES + len(torn[0])) + (
                    len(junk) >= framed_size(len(torn[0])) + RECORD_HEADER_BYTES + len(torn[1]))
            junk = junk[:room]
            if junk:
                with open(tail_path, "r+b") as segment:
                    segment.seek(tail_end)
                    segment.write(junk)
                queue = verify(path, reported_append, reported_ack)
                assert queue.next_seq == next_seq + kept
                with open(tail_path, "rb") as segment:
                    segment.seek(queue._state.segments[-1].end)
                    assert not segment.read().strip(b"\0"), "bytes after the tail survived"
                garbage_cut += 1
            else:
                queue = verify(path, reported_append, reported_ack)
        queue.close()
    assert reported_append > 100 and reported_ack > 0, "children made too little progress"
    assert garbage_cut >= KILLS // 10
    with PersistentQueue.open(path, **OPEN_ARGS) as queue:
        assert queue.first_seq > 1, "no segment was ever reclaimed"
        print(f"{KILLS} kills: {reported_append} records, first retained {queue.first_seq}")


def test_damage_inside_durable_data_is_reported_not_skipped(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with PersistentQueue.open(path, consumers=["c"], **OPEN_ARGS) as queue:
        for _ in range(80):
            first = queue.next_seq
            queue.append([payload_for(s) for s in range(first, first + 10)])
        segments = [(s.path, s.end) for s in queue._state.segments]
    assert len(segments) >= 3
    older_path, older_end = segments[0]
    # A flipped byte in an older (synced) segment: reading it fails and names the file.
    with open(older_path, "r+b") as segment:
        segment.seek(older_end // 2)
        byte = segment.read(1)
        segment.seek(older_end // 2)
        segment.write(bytes([byte[0] ^ 0x40]))
    with PersistentQueue.open(path, **OPEN_ARGS) as queue:
        with pytest.raises(QueueCorrupted, match=os.path.basename(older_path)):
            seq = queue.first_seq
            while seq < queue.next_seq:
                seq = queue.read(seq, max_records=64)[-1].seq + 1
        assert queue.read(queue._state.segments[-1].first_seq)  # other segments still readable


def test_damage_before_later_writes_in_the_last_segment_fails_the_open(tmp_path: Path) -> None:
    path = tmp_path / "q"
    with PersistentQueue.open(path, **OPEN_ARGS) as queue:
        for _ in range(5):  # five separate writes, each synced before the next
            first = queue.next_seq
            queue.append([payload_for(s) for s in range(first, first + 3)])
        tail_path = queue._state.segments[-1].path
    with open(tail_path, "r+b") as segment:
        segment.seek(32 + 17)  # in the first payload: synced long before the others
        segment.write(b"\xff\xff")
    with pytest.raises(QueueCorrupted, match="intact records written after it"):
        PersistentQueue.open(path, **OPEN_ARGS)


THREADED_REPORT = struct.Struct("<QQII")  # first seq, count, thread, batch number


def threaded_payload(life: int, thread: int, batch: int, index: int) -> bytes:
    return b"%d/%d/%d/%d|" % (life, thread, batch, index) * (index % 5 + 1)


def threaded_child(path: Path, write_fd: int, *, life: int) -> None:
    """Four appender threads (group commit) and an acker, all killed at once."""
    queue = PersistentQueue.open(path, consumers=["c"], **OPEN_ARGS)
    write_lock = threading.Lock()

    def appender(thread: int) -> None:
        rng = random.Random(life * 100 + thread)
        for batch in itertools.count():
            payloads = [threaded_payload(life, thread, batch, index)
                        for index in range(rng.randint(1, 20))]
            try:
                seqs = queue.append(payloads, timeout=1.0)
            except QueueFull:
                continue
            with write_lock:
                os.write(write_fd, THREADED_REPORT.pack(seqs.start, len(seqs), thread, batch))

    for thread in range(4):
        threading.Thread(target=appender, args=(thread,), daemon=True).start()
    while True:
        queue.wait(queue.acked("c") + 200, timeout=0.01)
        queue.ack("c", max(queue.acked("c"), queue.durable_seq - 100))


def test_sigkill_with_concurrent_appenders_loses_no_reported_batch(tmp_path: Path) -> None:
    path = tmp_path / "q"
    rng = random.Random(99)
    expected: dict[int, bytes] = {}  # reported, not yet known to be acked
    reported_batches = 0
    for life in range(max(20, KILLS // 10)):
        child = functools.partial(threaded_child, path, life=life)
        buffer = fork_and_kill(child, run_for=rng.uniform(0.02, 0.08))
        usable = len(buffer) - len(buffer) % THREADED_REPORT.size
        for first, count, thread, batch in THREADED_REPORT.iter_unpack(buffer[:usable]):
            reported_batches += 1
            for index in range(count):
                expected[first + index] = threaded_payload(life, thread, batch, index)
        with PersistentQueue.open(path, consumers=["c"], **OPEN_ARGS) as queue:
            acked = queue.acked("c")  # (registered here if the child died before opening)
            assert queue.next_seq > max(expected, default=0), "reported records lost at the tail"
            assert queue.first_seq <= acked + 1, "unacknowledged records were deleted"
            records = []
            seq = acked + 1
            while seq < queue.next_seq:
                records.extend(queue.read(seq, max_records=4096, max_bytes=1 << 30))
                seq = records[-1].seq + 1
            assert [r.seq for r in records] == list(range(acked + 1, queue.next_seq))
            present = {r.seq: r.payload for r in records}
            for seq, payload in expected.items():
                if seq > acked:
                    assert present.get(seq) == payload, f"life {life}: reported seq {seq} lost"
            expected = {s: p for s, p in expected.items() if s > acked}
    assert reported_batches > 100, "children made too little progress"
