"""Property test: random append/read/ack/consumer/reopen/power-cut sequences vs a model."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from support.simfs import SimFS

from iotpipe.queue import PersistentQueue, QueueFull

pytestmark = pytest.mark.unit

QUEUE_DIR = "/sim/q"
CAPACITY = 16 << 10
SEGMENT = 4 << 10  # small, so batches span segments and the queue fills up
NAMES = ("a", "b", "c")
PAYLOADS = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda size, fill: bytes([fill]) * size, st.integers(0, 1500), st.integers(0, 255)),
)


class QueueModel(RuleBasedStateMachine):
    """The model: every payload ever appended (index = seq - 1) and the cursors."""

    def __init__(self) -> None:
        super().__init__()
        self.fs = SimFS()
        self.payloads: list[bytes] = []
        self.cursors: dict[str, int] = {"a": 0}
        self.floor_seen = 1
        self.queue = self._open(consumers=("a",))

    def _open(self, consumers: tuple[str, ...] = ()) -> PersistentQueue:
        return PersistentQueue.open(QUEUE_DIR, capacity_bytes=CAPACITY, segment_bytes=SEGMENT,
                                    consumers=consumers, file_io=self.fs)

    def teardown(self) -> None:
        self.queue.close()

    @rule(batch=st.lists(PAYLOADS, max_size=12))
    def append(self, batch: list[bytes]) -> None:
        before = self.queue.next_seq
        try:
            seqs = self.queue.append(batch)
        except QueueFull:
            assert self.queue.next_seq == before  # all or nothing
            assert batch
            return
        assert seqs == range(len(self.payloads) + 1, len(self.payloads) + 1 + len(batch))
        self.payloads.extend(batch)

    @rule(data=st.data(), max_records=st.integers(1, 40), max_bytes=st.integers(1, 3000))
    def read(self, data: st.DataObject, max_records: int, max_bytes: int) -> None:
        next_seq = len(self.payloads) + 1
        from_seq = data.draw(st.integers(-1, next_seq + 1), label="from_seq")
        records = self.queue.read(from_seq, max_records=max_records, max_bytes=max_bytes)
        start = max(from_seq, self.queue.first_seq)
        expected = [(seq, self.payloads[seq - 1]) for seq in range(start, next_seq)]
        assert [(r.seq, r.payload) for r in records] == expected[:len(records)]
        if expected:
            assert records, "at least one record when one exists"
        total = sum(len(r.payload) for r in records)
        assert len(records) <= max_records
        assert total <= max_bytes or len(records) == 1
        if len(records) < min(max_records, len(expected)):  # stopped early: only for bytes
            assert total + len(expected[len(records)][1]) > max_bytes

    @rule(name=st.sampled_from(NAMES), data=st.data())
    def ack(self, name: str, data: st.DataObject) -> None:
        if name not in self.cursors:
            with pytest.raises(KeyError):
                self.queue.ack(name, 0)
            return
        seq = data.draw(st.one_of(st.just(len(self.payloads)), st.integers(0, len(self.payloads))),
                        label="ack seq")
        self.queue.ack(name, seq)
        self.cursors[name] = max(self.cursors[name], seq)

    @rule(name=st.sampled_from(NAMES))
    def register(self, name: str) -> None:
        self.queue.register_consumer(name)
        self.cursors.setdefault(name, self.queue.first_seq - 1)

    @rule(name=st.sampled_from(NAMES))
    def unregister(self, name: str) -> None:
        self.queue.unregister_consumer(name)
        self.cursors.pop(name, None)

    @rule()
    def reopen(self) -> None:
        self.queue.close()
        self.queue = self._open()

    @precondition(lambda self: bool(self.payloads))
    @rule(seed=st.integers(0, 1 << 16), mode=st.sampled_from(["drop", "prefix", "sectors"]))
    def power_cut(self, seed: int, mode: str) -> None:
        # Every append returned, so everything must survive whatever was not synced.
        self.fs = self.fs.power_cut(random.Random(seed), mode)
        self.queue = self._open()

    @invariant()
    def matches_model(self) -> None:
        queue = self.queue
        assert queue.next_seq == len(self.payloads) + 1
        assert {name: queue.acked(name) for name in queue.consumers} == self.cursors
        first = queue.first_seq
        assert first >= self.floor_seen  # never moves back
        self.floor_seen = first
        if self.cursors:
            assert first <= min(self.cursors.values()) + 1, "unacked records were reclaimed"
        floor = min(self.cursors.values()) if self.cursors else first - 1
        assert queue.depth().records == len(self.payloads) - max(floor, first - 1)


TestQueueModel = QueueModel.TestCase
TestQueueModel.settings = settings(max_examples=100, stateful_step_count=50, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])
