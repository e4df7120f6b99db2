"""Intake: the batches that arrived together become one group-commit plan (sans-I/O).

A plan holds the log records to append and, per batch, which readings are new; once its
records are durable, the plan becomes ``ack`` replies, or ``busy`` replies when it could
not be stored.

Two ways to drive it. ``commit`` takes an ``append`` that returns once the records are
durable. ``take`` + ``durable`` pipeline: ``take`` has each plan placed in the log (not yet
durable) and answers only refusals; ``durable(seq)`` answers, in order, every plan whose
records are durable up to ``seq``. Meanwhile later plans are made against the marks of the
plans still in flight, so a batch resent while its first copy is being written is not
stored twice, and its ack waits for that write too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from iotpipe import wire
from iotpipe.middle import hot
from iotpipe.middle.dedup import NodeMarks
from iotpipe.middle.intervals import IntervalSet

__all__ = ["Append", "Intake", "IntakeCounters", "IntakePlan", "PlannedBatch", "Reply"]


class Reply(NamedTuple):
    peer: bytes  # ZeroMQ routing id
    frames: list[bytes]


class PlannedBatch(NamedTuple):  # a tuple: one made per batch, and cheaper than a class
    peer: bytes
    batch: wire.Batch
    last: int  # the batch's last node seq
    new: list[tuple[int, int]]  # node seq ranges of this batch that get stored
    stored_before: bool  # every reading was already durable before this plan
    skipped_ahead: bool  # started above the node's high-water mark + 1 (a hole opens)


@dataclass
class IntakePlan:
    batches: list[PlannedBatch] = field(default_factory=list)
    # The encoded log records to append, in order (``hot.log_run``: one buffer, no object
    # per record, when the C module is built).
    records: Sequence[bytes] = ()
    provisional: dict[str, IntervalSet] = field(default_factory=dict)
    received: int = 0  # readings in the plan's batches

    @property
    def duplicates(self) -> int:
        return self.received - len(self.records)


@dataclass
class IntakeCounters:
    batches: int = 0
    records: int = 0
    duplicates: int = 0
    busy: int = 0
    skipped_ahead: int = 0  # batches that started above a node's high-water mark + 1


# Makes a plan's records durable: None once they are, else why not (then nothing is stored).
Append = Callable[[IntakePlan], str | None]
# Places a plan's records in the log: the log seq that must be durable before the plan's
# batches are acknowledged (the last seq placed so far, also for a plan without records),
# else why not (then nothing is placed).
Place = Callable[[IntakePlan], int | str]


class Intake:
    """Plans a group commit for batches that arrived together and answers them."""

    def __init__(self, marks: NodeMarks) -> None:
        self.marks = marks  # what is durable in the log
        self.counters = IntakeCounters()
        self._held: deque[tuple[int, IntakePlan]] = deque()  # placed, awaiting durability
        self._placed_marks: dict[str, IntervalSet] = {}  # per node, with the held plans'

    @property
    def held(self) -> int:
        """Plans placed in the log whose batches are not answered yet."""
        return len(self._held)

    def plan(self, arrivals: Sequence[tuple[bytes, wire.Batch]]) -> IntakePlan:
        """The records to append for ``arrivals`` (in order); marks change only on commit."""
        plan = IntakePlan()
        parts: list[hot.LogPart] = []  # the new readings, encoded in one go at the end
        received = 0
        for peer, batch in arrivals:
            node, first, readings = batch
            count = len(readings)
            last = first + count - 1
            received += count
            marks = plan.provisional.get(node)
            if marks is None:
                base = self._placed_marks.get(node)
                if base is None:
                    base = self.marks.get(node)
                marks = plan.provisional[node] = base.copy()
            high = marks.highest()
            if first > high:
                # The common case (first == high + 1): all new. The committed marks are a
                # subset of the provisional ones, so nothing of it was stored before.
                parts.append((node, first, readings))
                marks.add(first, last)
                plan.batches.append(PlannedBatch(peer, batch, last, [(first, last)], False,
                                                 high > 0 and first > high + 1))
                continue
            stored_before = self.marks.get(node).covers(first, last)
            skipped_ahead = False  # first <= high: not above the high-water mark
            new = marks.uncovered(first, last)
            for a, b in new:
                marks.add(a, b)
                parts.append((node, a, readings if a == first and b == last
                              else readings[a - first:b - first + 1]))
            plan.batches.append(PlannedBatch(peer, batch, last, new, stored_before,
                                             skipped_ahead))
        plan.received = received
        if parts:
            plan.records = hot.log_run(parts)
        return plan

    def committed(self, plan: IntakePlan) -> list[Reply]:
        """The plan's records are durable: adopt its marks and acknowledge every batch."""
        for node, marks in plan.provisional.items():
            self.marks.replace(node, marks)
        self.counters.batches += len(plan.batches)
        self.counters.records += len(plan.records)
        self.counters.duplicates += plan.duplicates
        self.counters.skipped_ahead += sum(pb.skipped_ahead for pb in plan.batches)
        encode_ack = wire.encode_ack
        return [Reply(pb.peer, encode_ack(pb.batch.node, pb.last)) for pb in plan.batches]

    def commit(self, arrivals: Sequence[tuple[bytes, wire.Batch]], append: Append,
               retry_ms: int) -> list[Reply]:
        """Store ``arrivals`` through ``append`` and answer every batch, in arrival order.

        ``append`` makes a plan's records durable (it is only called for plans with
        records) and returns None, or the reason it could not. When the whole group does
        not fit, batches are stored one at a time in arrival order and everything from the
        first that does not fit is refused, so an ingest node's batches keep their order.
        """
        plan = self.plan(arrivals)
        refusal = append(plan) if plan.records else None
        if refusal is None:
            return self.committed(plan)
        if len(arrivals) == 1:
            return self.refused(plan, retry_ms, refusal)
        replies: list[Reply] = []
        for i, arrival in enumerate(arrivals):
            single = self.plan([arrival])
            refusal = append(single) if single.records else None
            if refusal is not None:
                return replies + self.refused(self.plan(arrivals[i:]), retry_ms, refusal)
            replies += self.committed(single)
        return replies

    def take(self, arrivals: Sequence[tuple[bytes, wire.Batch]], place: Place,
             retry_ms: int) -> list[Reply]:
        """Place ``arrivals`` through ``place``; the refusals now, the acks from ``durable``.

        As ``commit``: when the whole group does not fit, batches are placed one at a time
        in arrival order and everything from the first that does not fit is refused.
        """
        plan = self.plan(arrivals)
        outcome = place(plan)
        if not isinstance(outcome, str):
            self._hold(plan, outcome)
            return []
        if len(arrivals) == 1:
            return self.refused(plan, retry_ms, outcome)
        for i, arrival in enumerate(arrivals):
            single = self.plan([arrival])
            outcome = place(single)
            if isinstance(outcome, str):
                return self.refused(self.plan(arrivals[i:]), retry_ms, outcome)
            self._hold(single, outcome)
        return []

    def durable(self, seq: int) -> list[Reply]:
        """The log is durable up to ``seq``: adopt the marks of every held plan it covers
        and acknowledge their batches, in the order they were placed."""
        replies: list[Reply] = []
        held = self._held
        while held and held[0][0] <= seq:
            replies += self.committed(held.popleft()[1])
        if not held:
            self._placed_marks.clear()  # all adopted: self.marks is the latest again
        return replies

    def _hold(self, plan: IntakePlan, needs: int) -> None:
        self._held.append((needs, plan))
        self._placed_marks.update(plan.provisional)

    def refused(self, plan: IntakePlan, retry_ms: int, reason: str) -> list[Reply]:
        """Nothing of the plan was stored: ``busy`` for every batch that needed storing.

        A batch that was entirely durable before this plan is still acknowledged.
        """
        replies: list[Reply] = []
        for pb in plan.batches:
            if pb.stored_before:
                self.counters.duplicates += len(pb.batch.readings)
                replies.append(Reply(pb.peer, wire.encode_ack(pb.batch.node, pb.last)))
            else:
                self.counters.busy += 1
                replies.append(Reply(pb.peer, wire.encode_busy(
                    pb.batch.node, pb.batch.first, retry_ms, reason)))
        return replies
