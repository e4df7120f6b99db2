"""Simulated power loss: unsynced writes vanish (all, a torn prefix, or random sectors).

Each run appends and acknowledges at random on the in-memory file system, cuts the power
at a random file operation (often in the middle of an append or a ledger write), then
reopens what survived and checks the promise: every record whose ``append`` returned is
there, intact and in order, and every ``ack`` that returned is kept. A variant of the queue
that acknowledges before it syncs must fail the very same check.
"""

from __future__ import annotations

import contextlib
import random

import pytest
from support.simfs import PowerCut, SimFS

from iotpipe.queue import PersistentQueue, QueueCorrupted, QueueError, QueueFull
from iotpipe.queue.segments import Segment
from iotpipe.queue.writer import Writer

pytestmark = pytest.mark.crash

QUEUE_DIR = "/sim/q"
OPEN_ARGS = {"capacity_bytes": 64 << 10, "segment_bytes": 8192}


def payload_for(seq: int, life: int) -> bytes:
    return f"{life}/{seq}|".encode() * (seq % 13 + 1)


class AckBeforeSyncWriter(Writer):
    """The bug the test must catch: each group's sync is put off until the next group."""

    def write_durably(self, segment: Segment, data: bytes, offset: int) -> None:
        io = self._state.io
        io.pwrite(segment.handle, data, offset)
        deferred = getattr(self, "_deferred", None)
        if deferred is not None and deferred.handle is not None:
            io.fdatasync(deferred.handle)
        self._deferred = segment


class AckBeforeSync(PersistentQueue):
    _writer_class = AckBeforeSyncWriter


class ReportBeforeSyncWriter(Writer):
    """The pipelined path's bug the test must catch: a group reported durable once it is
    placed, before its write."""

    def poll_durable(self, wait: bool = False) -> int:
        super().poll_durable(wait)
        return self._state.next_seq - 1


class ReportBeforeSync(PersistentQueue):
    _writer_class = ReportBeforeSyncWriter


class Tracker:
    """What the application was told: acknowledged records and acks."""

    def __init__(self) -> None:
        self.offered: dict[int, set[bytes]] = {}  # every payload ever offered for a seq
        self.acknowledged: dict[int, bytes] = {}
        self.acked = 0


def run_life(queue: PersistentQueue, tracker: Tracker, rng: random.Random, life: int,
             steps: int, pipelined: bool = False) -> None:
    """Random appends and acks until the power cut (PowerCut) or ``steps`` are done.

    ``pipelined``: appends are placed with ``append_nowait`` and written as groups of
    several batches (on the caller's thread or the background worker, at random); a record
    counts as acknowledged once ``poll_durable`` reported it.
    """
    placed: dict[int, bytes] = {}
    for _ in range(steps):
        if rng.random() < 0.75:
            first = queue.next_seq
            batch = [payload_for(seq, life) for seq in range(first, first + rng.randint(1, 12))]
            for offset, payload in enumerate(batch):
                tracker.offered.setdefault(first + offset, set()).add(payload)
            try:
                seqs = queue.append_nowait(batch) if pipelined else queue.append(batch)
            except QueueFull:
                continue
            if not pipelined:
                tracker.acknowledged.update(zip(seqs, batch, strict=True))
                continue
            placed.update(zip(seqs, batch, strict=True))
            if rng.random() < 0.5:
                queue.start_write(background=rng.random() < 0.5)
            durable = queue.poll_durable(wait=rng.random() < 0.5)
            for seq in [s for s in placed if s <= durable]:
                tracker.acknowledged[seq] = placed.pop(seq)
        elif queue.durable_seq > tracker.acked:
            target = rng.randint(tracker.acked + 1, queue.durable_seq)
            queue.ack("c", target)
            tracker.acked = target


def check_after_power_cut(fs: SimFS, tracker: Tracker, queue_class: type[PersistentQueue]
                          ) -> list[str]:
    """Problems found after reopening; empty when the promise held."""
    problems: list[str] = []
    try:
        queue = queue_class.open(QUEUE_DIR, consumers=["c"], file_io=fs, **OPEN_ARGS)
    except QueueCorrupted as exc:
        return [f"reopen failed: {exc}"]
    try:
        records = []
        seq = queue.first_seq
        while seq < queue.next_seq:
            batch = queue.read(seq, max_records=1000, max_bytes=1 << 30)
            if not batch:
                problems.append(f"read({seq}) returned nothing below next_seq {queue.next_seq}")
                break
            records.extend(batch)
            seq = batch[-1].seq + 1
        seqs = [record.seq for record in records]
        if seqs != list(range(queue.first_seq, queue.next_seq)):
            problems.append("records are not contiguous from first_seq")
        present = {record.seq: record.payload for record in records}
        for record in records:
            if record.payload not in tracker.offered.get(record.seq, ()):
                problems.append(f"seq {record.seq} holds a payload nobody appended")
        lost = sorted(s for s, payload in tracker.acknowledged.items()
                      if s > queue.acked("c") and present.get(s) != payload)
        if lost:
            problems.append(f"acknowledged records lost: {lost[:10]} ({len(lost)})")
        if queue.acked("c") < tracker.acked:
            problems.append(f"ack {tracker.acked} lost (ledger says {queue.acked('c')})")
        if tracker.acknowledged and queue.next_seq <= max(tracker.acknowledged):
            problems.append(f"next_seq {queue.next_seq} reuses acknowledged seqs")
    finally:
        queue.close()
    return problems


def one_run(seed: int, mode: str, queue_class: type[PersistentQueue],
            pipelined: bool = False) -> list[str]:
    rng = random.Random(seed)
    fs = SimFS()
    tracker = Tracker()
    for life in range(3):
        queue = queue_class.open(QUEUE_DIR, consumers=["c"], file_io=fs, **OPEN_ARGS)
        fs.ops_until_cut = rng.randint(0, 120)
        with contextlib.suppress(PowerCut, QueueError):  # the machine is off: process gone
            run_life(queue, tracker, rng, life, steps=60, pipelined=pipelined)
        fs.ops_until_cut = None
        fs = fs.power_cut(rng, mode)
        problems = check_after_power_cut(fs, tracker, queue_class)
        if problems:
            return [f"seed {seed} mode {mode} life {life}: {p}" for p in problems]
    return []


@pytest.mark.parametrize("mode", ["drop", "prefix", "sectors"])
def test_power_cut_keeps_every_acknowledged_record(mode: str) -> None:
    failures = [problem for seed in range(150) for problem in one_run(seed, mode,
                                                                       PersistentQueue)]
    assert failures == []


@pytest.mark.parametrize("mode", ["drop", "prefix", "sectors"])
def test_a_queue_that_acks_before_syncing_fails_the_same_check(mode: str) -> None:
    failures = [problem for seed in range(150) for problem in one_run(seed, mode,
                                                                       AckBeforeSync)]
    assert any("acknowledged records lost" in problem for problem in failures), failures[:5]


@pytest.mark.parametrize("mode", ["drop", "prefix", "sectors"])
def test_power_cut_keeps_every_record_reported_durable_by_pipelined_appends(mode: str) -> None:
    failures = [problem for seed in range(150)
                for problem in one_run(seed, mode, PersistentQueue, pipelined=True)]
    assert failures == []


@pytest.mark.parametrize("mode", ["drop", "prefix", "sectors"])
def test_pipelined_appends_reported_durable_before_their_write_fail_the_check(mode: str
                                                                             ) -> None:
    failures = [problem for seed in range(150)
                for problem in one_run(seed, mode, ReportBeforeSync, pipelined=True)]
    assert any("acknowledged records lost" in problem for problem in failures), failures[:5]


def test_torn_tail_is_cut_so_stale_bytes_never_follow_new_records() -> None:
    rng = random.Random(7)
    fs = SimFS()
    queue = PersistentQueue.open(QUEUE_DIR, file_io=fs, **OPEN_ARGS)
    queue.append([b"a" * 100] * 5)
    # The next group is written but the power fails before its sync.
    fs.ops_until_cut = 1
    with pytest.raises(QueueError):
        queue.append([b"b" * 100] * 5)
    fs = fs.power_cut(rng, "prefix")
    segment = next(path for path in fs.files if path.endswith(".seg"))
    # Whatever survived of the torn group, recovery zeroes everything after the cut.
    queue = PersistentQueue.open(QUEUE_DIR, file_io=fs, **OPEN_ARGS)
    tail = queue._state.segments[-1].end
    assert not any(fs.files[segment].durable[tail:])
    assert [r.payload for r in queue.read(1, max_records=100)][:5] == [b"a" * 100] * 5
    queue.close()


def test_a_full_disk_is_backpressure_not_a_broken_queue() -> None:
    fs = SimFS()
    queue = PersistentQueue.open(QUEUE_DIR, consumers=["c"], file_io=fs, **OPEN_ARGS)
    queue.append([b"x" * 1000] * 8)  # fills the first 8 KiB segment
    fs.free = 4096  # less than a segment (plus reserve) left on the disk
    with pytest.raises(QueueFull, match="disk"):
        queue.append([b"y" * 1000])
    assert queue.append([]) == range(9, 9)  # the queue still works
    fs.free = 1 << 40
    assert queue.append([b"y" * 1000]) == range(9, 10)
    assert queue.read(9)[0].payload == b"y" * 1000
    queue.close()
