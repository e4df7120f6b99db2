"""Unit tests of the middle tier's sans-I/O cores: marks, intake, checkpoint, feed."""

from __future__ import annotations

import itertools
import random

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe import wire
from iotpipe.middle import hot
from iotpipe.middle.core import (
    CheckpointError,
    FeedCore,
    Intake,
    IntervalSet,
    NodeMarks,
    UnknownGroup,
    decode_checkpoint,
    encode_checkpoint,
    reading_topic,
)

pytestmark = pytest.mark.unit


def reading(device: str, n: int) -> bytes:
    return wire.encode_reading(device, f"m{n}", n, b'{"v":1}', n)


def batch(node: str, first: int, n: int, decoded: bool = True) -> wire.Batch:
    """A batch as the middle's server gets it (``hot.decode_batch``: with the C module, its
    readings are a run of spans over the body), or built from a list (``decoded=False``)."""
    readings = [reading("dev", first + i) for i in range(n)]
    if not decoded:
        return wire.Batch(node, first, readings)
    return hot.decode_batch(wire.encode_batch(node, first, readings))


# -- IntervalSet -------------------------------------------------------------------------


def test_interval_set_merges_adjacent_and_overlapping() -> None:
    s = IntervalSet()
    s.add(5, 7)
    s.add(1, 2)
    s.add(3, 4)  # touches both neighbours
    assert s.ranges() == [(1, 7)]
    s.add(10, 12)
    s.add(6, 11)
    assert s.ranges() == [(1, 12)]


def test_interval_set_remove_splits() -> None:
    s = IntervalSet([(1, 10), (20, 30)])
    s.remove(5, 22)
    assert s.ranges() == [(1, 4), (23, 30)]
    s.remove(100, 200)
    assert s.ranges() == [(1, 4), (23, 30)]


def test_interval_set_uncovered_and_covers() -> None:
    s = IntervalSet([(3, 5), (8, 9)])
    assert s.uncovered(1, 10) == [(1, 2), (6, 7), (10, 10)]
    assert s.uncovered(3, 5) == []
    assert s.covers(3, 5) and not s.covers(3, 6)
    assert 4 in s and 6 not in s


def test_interval_set_matches_a_plain_set() -> None:
    rng = random.Random(7)
    s = IntervalSet()
    model: set[int] = set()
    for _ in range(2000):
        a = rng.randint(1, 200)
        b = a + rng.randint(0, 15)
        if rng.random() < 0.6:
            s.add(a, b)
            model |= set(range(a, b + 1))
        else:
            s.remove(a, b)
            model -= set(range(a, b + 1))
        assert s.count() == len(model)
        ranges = s.ranges()
        assert all(ranges[i][1] + 1 < ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert {x for a, b in s for x in range(a, b + 1)} == model


# -- intake and dedup --------------------------------------------------------------------


def acks(replies: list) -> list[wire.Ack]:
    return [wire.decode_ack(r.frames) for r in replies]


def test_new_batch_is_stored_and_acked() -> None:
    intake = Intake(NodeMarks())
    plan = intake.plan([(b"p", batch("n1", 1, 3))])
    assert len(plan.records) == 3
    assert [wire.decode_log_record(r)[:2] for r in plan.records] == [("n1", 1), ("n1", 2),
                                                                     ("n1", 3)]
    assert intake.marks.high_water("n1") == 0  # not before the append returned
    assert acks(intake.committed(plan)) == [wire.Ack("n1", 3)]
    assert intake.marks.high_water("n1") == 3


def test_resent_batch_is_acked_without_storing() -> None:
    intake = Intake(NodeMarks())
    intake.committed(intake.plan([(b"p", batch("n1", 1, 3))]))
    plan = intake.plan([(b"p", batch("n1", 1, 3))])
    assert list(plan.records) == []
    assert acks(intake.committed(plan)) == [wire.Ack("n1", 3)]
    assert intake.counters.duplicates == 3


def test_straddling_batch_stores_only_the_new_part() -> None:
    intake = Intake(NodeMarks())
    intake.committed(intake.plan([(b"p", batch("n1", 1, 5))]))
    plan = intake.plan([(b"p", batch("n1", 4, 4))])  # seqs 4..7, 4 and 5 known
    stored = [wire.decode_log_record(r) for r in plan.records]
    assert [r.node_seq for r in stored] == [6, 7]
    assert [wire.decode_reading(r.reading).msg_id for r in stored] == ["m6", "m7"]
    assert list(hot.record_readings(plan.records)) == [r.reading for r in stored]
    assert acks(intake.committed(plan)) == [wire.Ack("n1", 7)]
    assert intake.marks.get("n1").ranges() == [(1, 7)]


def test_same_batch_twice_in_one_group_is_stored_once() -> None:
    intake = Intake(NodeMarks())
    plan = intake.plan([(b"p", batch("n1", 1, 3)), (b"p", batch("n1", 1, 3)),
                        (b"q", batch("n2", 1, 2))])
    assert len(plan.records) == 5
    assert acks(intake.committed(plan)) == [wire.Ack("n1", 3), wire.Ack("n1", 3),
                                           wire.Ack("n2", 2)]


def test_skipped_batch_keeps_its_hole_open() -> None:
    # Batch 4..6 arrives while 1..3 was lost in transit: the resent 1..3 must still be stored.
    intake = Intake(NodeMarks())
    intake.committed(intake.plan([(b"p", batch("n1", 4, 3))]))
    plan = intake.plan([(b"p", batch("n1", 1, 6))])
    assert [wire.decode_log_record(r).node_seq for r in plan.records] == [1, 2, 3]
    intake.committed(plan)
    assert intake.marks.get("n1").ranges() == [(1, 6)]


def test_refused_plan_answers_busy_and_changes_no_marks() -> None:
    intake = Intake(NodeMarks())
    intake.committed(intake.plan([(b"p", batch("n1", 1, 2))]))
    plan = intake.plan([(b"p", batch("n1", 1, 2)), (b"p", batch("n1", 3, 2)),
                        (b"p", batch("n1", 3, 2))])
    replies = intake.refused(plan, retry_ms=250, reason="log full")
    assert wire.decode_ack(replies[0].frames) == wire.Ack("n1", 2)  # was durable before
    # the second copy of 3..4 was only provisionally covered: it must not be acked
    assert [wire.decode_busy(r.frames) for r in replies[1:]] == [
        wire.Busy("n1", 3, 250, "log full")] * 2
    assert intake.marks.get("n1").ranges() == [(1, 2)]
    assert intake.counters.busy == 2


def test_marks_bound_their_holes() -> None:
    marks = NodeMarks(max_ranges=3)
    for first in (1, 10, 20, 30):
        marks.add("n", first, first + 1)
    assert marks.get("n").ranges() == [(1, 11), (20, 21), (30, 31)]


def test_checkpoint_round_trip_and_damage() -> None:
    marks = NodeMarks()
    marks.add("a", 1, 10)
    marks.add("a", 15, 20)
    marks.add("b-p1", 3, 4)
    data = encode_checkpoint(42, marks)
    ckpt = decode_checkpoint(data)
    assert ckpt.log_seq == 42 and ckpt.marks == marks
    damaged = bytearray(data)
    damaged[-1] ^= 0xFF
    with pytest.raises(CheckpointError, match="checksum"):
        decode_checkpoint(bytes(damaged))
    with pytest.raises(CheckpointError, match="shorter"):
        decode_checkpoint(data[:5])
    with pytest.raises(CheckpointError, match="magic"):
        decode_checkpoint(b"X" * 40)


@pytest.mark.parametrize("device", ["d", "x" * 31, "x" * 32, "é" * 100, "y" * 300,
                                    "z" * 70000])
def test_reading_topic_matches_the_decoded_device_id(device: str) -> None:
    assert reading_topic(reading(device, 1)) == device.encode()


@pytest.mark.parametrize("data", [b"", b"\x95", b"\xc1garbage", b"\x95\xd9",
                                  b"\x95\xa5ab", b"\x94\xa1d", b"\x95\x01"])
def test_reading_topic_rejects_what_is_not_a_reading(data: bytes) -> None:
    assert reading_topic(data) is None


# -- feed --------------------------------------------------------------------------------


def req(consumer: str, credit: int, acks_: list[tuple[int, int]] = (),  # type: ignore[assignment]
        group: str = "storage") -> wire.FeedRequest:
    return wire.FeedRequest(group, consumer, credit, list(acks_))


def drain(core: FeedCore, now: float, tail: int) -> list[tuple[bytes, int, int]]:
    out = []
    while (lease := core.next_delivery(now, tail)) is not None:
        out.append((lease.peer, lease.first, lease.last))
    return out


def test_feed_delivers_up_to_credit_in_max_record_chunks() -> None:
    core = FeedCore({"storage": 0}, max_records=4)
    core.on_request(b"A", req("c1", 10), now=0, tail=100)
    assert drain(core, 0, 100) == [(b"A", 1, 4), (b"A", 5, 8), (b"A", 9, 10)]
    assert core.consumer("storage", "c1").outstanding == 10
    # a heartbeat repeating the same credit grants nothing more
    core.on_request(b"A", req("c1", 10), now=1, tail=100)
    assert drain(core, 1, 100) == []
    core.on_request(b"A", req("c1", 10, [(1, 4)]), now=2, tail=100)
    assert drain(core, 2, 100) == [(b"A", 11, 14)]
    assert core.cursor("storage") == 4


def test_feed_long_poll_gets_data_once_appended() -> None:
    core = FeedCore({"storage": 0})
    core.on_request(b"A", req("c1", 100), now=0, tail=0)
    assert drain(core, 0, 0) == []
    assert drain(core, 0, 3) == [(b"A", 1, 3)]
    assert drain(core, 0, 5) == [(b"A", 4, 5)]


def test_feed_out_of_order_acks_advance_cursor_only_when_contiguous() -> None:
    core = FeedCore({"storage": 0}, max_records=2)
    core.on_request(b"A", req("c1", 6), now=0, tail=6)
    assert drain(core, 0, 6) == [(b"A", 1, 2), (b"A", 3, 4), (b"A", 5, 6)]
    core.on_request(b"A", req("c1", 6, [(5, 6), (3, 4)]), now=0, tail=6)
    assert core.cursor("storage") == 0
    assert core.lag("storage", 6) == 2
    core.on_request(b"A", req("c1", 6, [(1, 2)]), now=0, tail=6)
    assert core.cursor("storage") == 6
    assert core.lag("storage", 6) == 0
    assert core.leases("storage") == []


def test_feed_expired_lease_is_redelivered_to_another_consumer() -> None:
    core = FeedCore({"storage": 0}, lease_timeout=10, consumer_timeout=100)
    core.on_request(b"A", req("c1", 5), now=0, tail=5)
    assert drain(core, 0, 5) == [(b"A", 1, 5)]
    core.on_request(b"B", req("c2", 5), now=1, tail=5)
    assert drain(core, 1, 5) == []  # everything is leased to c1
    assert core.expire(now=9) == 0
    assert core.expire(now=10) == 5
    assert core.counters.redelivered_records == 5
    got = drain(core, 10, 5)
    assert sorted(first for _, first, _ in got) == [1]
    assert got[0][2] == 5


def test_feed_partial_ack_then_expiry_redelivers_only_unacked() -> None:
    core = FeedCore({"storage": 0}, lease_timeout=10, consumer_timeout=100)
    core.on_request(b"A", req("c1", 10), now=0, tail=10)
    assert drain(core, 0, 10) == [(b"A", 1, 10)]
    core.on_request(b"A", req("c1", 10, [(3, 4), (8, 10)]), now=1, tail=10)
    core.expire(now=11)
    core.on_request(b"A", req("c1", 10), now=11, tail=10)
    assert drain(core, 11, 10) == [(b"A", 1, 2), (b"A", 5, 7)]


def test_feed_reconnect_releases_the_old_sockets_leases() -> None:
    core = FeedCore({"storage": 0}, lease_timeout=1000)
    core.on_request(b"A", req("c1", 4), now=0, tail=8)
    assert drain(core, 0, 8) == [(b"A", 1, 4)]
    core.on_request(b"A2", req("c1", 8), now=1, tail=8)  # same consumer, new socket
    assert drain(core, 1, 8) == [(b"A2", 1, 4), (b"A2", 5, 8)]
    assert core.counters.redelivered_records == 4


def test_feed_peer_gone_and_silent_consumers_release_leases() -> None:
    core = FeedCore({"storage": 0}, lease_timeout=1000, consumer_timeout=5)
    core.on_request(b"A", req("c1", 3), now=0, tail=6)
    core.on_request(b"B", req("c2", 3), now=0, tail=6)
    assert sorted(drain(core, 0, 6)) == [(b"A", 1, 3), (b"B", 4, 6)]
    assert core.peer_gone(b"A") == 3
    assert core.consumer("storage", "c1") is None
    core.on_request(b"C", req("c3", 3), now=4, tail=6)
    assert drain(core, 4, 6) == [(b"C", 1, 3)]
    assert core.expire(now=6) == 3  # c2 silent since 0 with consumer_timeout 5
    assert core.consumer("storage", "c2") is None


def test_feed_shrink_returns_the_unsent_rest() -> None:
    core = FeedCore({"storage": 0}, max_records=10)
    core.on_request(b"A", req("c1", 10), now=0, tail=10)
    lease = core.next_delivery(0, 10)
    assert lease is not None and (lease.first, lease.last) == (1, 10)
    core.shrink(lease, 3)  # e.g. a byte limit on the read
    assert core.consumer("storage", "c1").outstanding == 3
    assert drain(core, 0, 10) == [(b"A", 4, 10)]
    with pytest.raises(ValueError):
        core.shrink(lease, 4)


def test_feed_acks_from_before_a_restart_are_skipped() -> None:
    # A restarted middle starts at the durable cursor; the consumer acks what it had.
    core = FeedCore({"storage": 2})
    core.on_request(b"A", req("c1", 100, [(5, 7)]), now=0, tail=10)
    assert drain(core, 0, 10) == [(b"A", 3, 4), (b"A", 8, 10)]
    core.on_request(b"A", req("c1", 100, [(3, 4), (8, 10)]), now=0, tail=10)
    assert core.cursor("storage") == 10


def test_feed_groups_are_independent_and_unknown_is_refused() -> None:
    core = FeedCore({"storage": 0, "lake": 0})
    core.on_request(b"A", req("c1", 5), now=0, tail=5)
    core.on_request(b"B", req("c1", 5, group="lake"), now=0, tail=5)
    assert sorted(drain(core, 0, 5)) == [(b"A", 1, 5), (b"B", 1, 5)]
    core.on_request(b"A", req("c1", 5, [(1, 5)]), now=0, tail=5)
    assert core.cursor("storage") == 5 and core.cursor("lake") == 0
    with pytest.raises(UnknownGroup):
        core.on_request(b"A", req("c1", 5, group="nope"), now=0, tail=5)


def test_feed_acks_above_the_tail_are_ignored() -> None:
    core = FeedCore({"storage": 0})
    core.on_request(b"A", req("c1", 0, [(1, 50)]), now=0, tail=5)
    assert core.cursor("storage") == 5
    assert core.counters.ignored_acks == 1


def test_feed_random_acks_and_expiry_deliver_everything() -> None:
    # Whatever order acks and expiries come in, every seq is eventually acked exactly up
    # to the tail and the cursor ends there.
    rng = random.Random(3)
    core = FeedCore({"storage": 0}, lease_timeout=5, consumer_timeout=1000, max_records=7)
    tail, now = 0, 0.0
    held: dict[str, list[tuple[int, int]]] = {"c1": [], "c2": []}
    peers = {"c1": b"A", "c2": b"B"}
    for _ in range(3000):
        now += rng.random()
        tail = min(500, tail + rng.randint(0, 5))
        name = rng.choice(["c1", "c2"])
        ack_now = [held[name].pop(rng.randrange(len(held[name])))
                   for _ in range(rng.randint(0, len(held[name])))]
        if rng.random() < 0.1:
            ack_now = []  # lose this ack batch: those leases expire and get redelivered
        core.on_request(peers[name], req(name, 20, ack_now), now, tail)
        core.expire(now)
        for peer, first, last in drain(core, now, tail):
            held["c1" if peer == b"A" else "c2"].append((first, last))
        # invariants: leases are disjoint, above the cursor, and add up to each window
        leases = sorted((lease.first, lease.last) for lease in core.leases("storage"))
        assert all(a[1] < b[0] for a, b in itertools.pairwise(leases))
        assert all(first > core.cursor("storage") for first, _ in leases)
        for consumer in ("c1", "c2"):
            state = core.consumer("storage", consumer)
            if state is None:
                continue  # has not sent a request yet
            leased = sum(lease.count for lease in core.leases("storage")
                         if lease.consumer == consumer)
            assert state.outstanding == leased <= 20
    for _ in range(200):
        now += 10
        core.expire(now)
        for name in ("c1", "c2"):
            core.on_request(peers[name], req(name, 20, held[name]), now, tail)
            held[name] = []
        for peer, first, last in drain(core, now, tail):
            held["c1" if peer == b"A" else "c2"].append((first, last))
    assert tail == 500
    assert core.cursor("storage") == 500


def test_recent_records_serve_contiguous_tail_within_budget() -> None:
    from iotpipe.middle.core import RecentRecords

    recent = RecentRecords(max_bytes=100)

    def get(first: int, max_records: int, max_bytes: int) -> list[bytes] | None:
        parts = recent.get(first, max_records, max_bytes)
        return None if parts is None else [r for part in parts for r in part]

    recent.extend(1, [b"a" * 10] * 5)  # seqs 1..5
    assert get(2, 2, 1000) == [b"a" * 10] * 2
    assert get(6, 1, 1000) is None and get(0, 1, 1000) is None
    assert get(1, 10, 25) == [b"a" * 10] * 2  # byte limit
    assert get(1, 10, 1) == [b"a" * 10]  # at least one record
    recent.extend(6, [b"b" * 10] * 8)  # 130 bytes > 100: the older group goes, never the newest
    assert get(1, 1, 1000) is None
    assert get(6, 10, 1000) == [b"b" * 10] * 8
    assert get(13, 1, 1000) == [b"b" * 10]
    assert get(9, 10, 1000) == [b"b" * 10] * 5
    recent.extend(20, [b"c"])  # a gap (e.g. appends by nobody else): start over
    assert get(13, 1, 1000) is None and get(20, 5, 1000) == [b"c"]


def test_recent_records_drop_only_the_oldest_groups_the_budget_needs() -> None:
    """A group at a time, not down to half the budget at once: freeing some 100,000
    records in one go stalled the middle's loop for about 7 ms."""
    from iotpipe.middle.core import RecentRecords

    recent = RecentRecords(max_bytes=100)
    for group in range(10):  # 30 bytes each: the newest three fit in 100
        recent.extend(group * 3 + 1, [bytes([65 + group]) * 10] * 3)
    assert recent.get(21, 1, 1000) is None  # groups 0-6 went
    parts = recent.get(22, 100, 1000)
    assert parts is not None
    assert [r for part in parts for r in part] == ([b"H" * 10] * 3 + [b"I" * 10] * 3
                                                   + [b"J" * 10] * 3)


def test_rebuild_marks_from_checkpoint_plus_retained_log(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from iotpipe.middle.store import read_checkpoint, rebuild_marks, write_checkpoint
    from iotpipe.queue import PersistentQueue

    ckpt_path = tmp_path / "marks.ckpt"
    assert read_checkpoint(ckpt_path, 16)[0] == 0  # none yet
    early = NodeMarks()
    early.add("a", 1, 100)  # records long gone from the log
    write_checkpoint(ckpt_path, encode_checkpoint(2, early))
    with PersistentQueue.open(tmp_path / "q", capacity_bytes=1 << 20,
                              consumers=["storage"]) as q:
        q.append([wire.encode_log_record(n, s, b"r") for n, s in
                  [("a", 99), ("a", 100), ("a", 101), ("a", 102), ("b", 5), ("a", 110)]])
        log_seq, marks = read_checkpoint(ckpt_path, 16)
        assert log_seq == 2
        assert rebuild_marks(q, log_seq, marks) == 4  # seqs 3..6 only
    assert marks.get("a").ranges() == [(1, 102), (110, 110)]
    assert marks.get("b").ranges() == [(5, 5)]
    ckpt_path.write_bytes(ckpt_path.read_bytes()[:-1])  # damaged: rebuild from the log alone
    assert read_checkpoint(ckpt_path, 16)[0] == 0


# -- property: intake never stores a seq twice and never acks an unstored one -------------

batch_strategy = st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 60), st.integers(1, 8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.lists(batch_strategy, min_size=1, max_size=5), st.booleans()),
                max_size=30))
def test_intake_stores_each_seq_once_and_acks_only_stored(
        groups: list[tuple[list[tuple[str, int, int]], bool]]) -> None:
    intake = Intake(NodeMarks(max_ranges=1000))
    stored: dict[tuple[str, int], int] = {}
    for group, log_full in groups:
        plan = intake.plan([(b"p", batch(node, first, n)) for node, first, n in group])
        if log_full:
            replies = intake.refused(plan, 100, "log full")
        else:
            for raw in plan.records:
                record = wire.decode_log_record(raw)
                key = (record.node, record.node_seq)
                stored[key] = stored.get(key, 0) + 1
            replies = intake.committed(plan)
        assert len(replies) == len(group)
        for (node, first, n), reply in zip(group, replies, strict=True):
            if wire.message_kind(reply.frames) == wire.KIND_ACK:
                assert wire.decode_ack(reply.frames) == wire.Ack(node, first + n - 1)
                assert all((node, s) in stored for s in range(first, first + n))
            else:
                assert log_full
    assert all(count == 1 for count in stored.values())
    for node in ("a", "b"):
        assert intake.marks.get(node).count() == sum(1 for k in stored if k[0] == node)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=6),
                min_size=1, max_size=30),
       st.integers(10, 200), st.booleans(), st.data())
def test_recent_records_match_the_appended_log(appends: list[list[bytes]], budget: int,
                                               runs: bool, data: st.DataObject) -> None:
    """Held as lists, or as runs of one buffer (``hot.log_run``'s, as the middle holds
    them): the parts ``get`` gives are the log's records, and pack as one list would."""
    from iotpipe.middle.core import RecentRecords

    recent = RecentRecords(max_bytes=budget)
    log: list[bytes] = []

    def get(first: int, max_records: int, max_bytes: int) -> list[bytes] | None:
        parts = recent.get(first, max_records, max_bytes)
        if parts is None:
            return None
        records = [r for part in parts for r in part]
        assert hot.pack_runs(parts) == msgpack.packb(records)
        return records

    for readings in appends:
        records = wire.encode_log_records("n", len(log) + 1, readings)
        held = hot.log_run([("n", len(log) + 1, readings)]) if runs else records
        recent.extend(len(log) + 1, held)
        log.extend(records)
        assert get(len(log), 1, 1) == [log[-1]]  # the newest is always held
        first = data.draw(st.integers(1, len(log)))
        max_records = data.draw(st.integers(1, 10))
        max_bytes = data.draw(st.integers(1, 100))
        got = get(first, max_records, max_bytes)
        if got is None:
            continue
        assert got == log[first - 1:first - 1 + len(got)]
        assert 1 <= len(got) <= max_records
        assert len(got) == 1 or sum(map(len, got)) <= max_bytes
        expected_len = 1
        while (expected_len < max_records and first - 1 + expected_len < len(log)
               and sum(map(len, log[first - 1:first + expected_len])) <= max_bytes):
            expected_len += 1
        assert len(got) == expected_len  # as many as the limits allow


def test_feed_skip_moves_past_a_range_the_log_lost() -> None:
    core = FeedCore({"storage": 0})
    core.on_request(b"A", req("c1", 10), now=0, tail=10)
    lease = core.next_delivery(0, 10)
    assert lease is not None
    core.shrink(lease, 0)
    core.skip("storage", 1, 4, tail=10)
    assert core.cursor("storage") == 4
    assert drain(core, 0, 10) == [(b"A", 5, 10)]


def _reference_plan(marks: NodeMarks, arrivals: list[tuple[bytes, wire.Batch]]
                    ) -> list[tuple[list[tuple[int, int]], bool, bool]]:
    """Each batch's (new ranges, stored before, skipped ahead) by the general range
    search alone: what ``Intake.plan``'s in-order fast path must agree with."""
    provisional: dict[str, IntervalSet] = {}
    out = []
    for _, b in arrivals:
        node_marks = provisional.setdefault(b.node, marks.get(b.node).copy())
        stored_before = marks.get(b.node).covers(b.first, b.last)
        skipped = bool(node_marks) and b.first > node_marks.highest() + 1
        new = node_marks.uncovered(b.first, b.last)
        for lo, hi in new:
            node_marks.add(lo, hi)
        out.append((new, stored_before, skipped))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(batch_strategy, min_size=1, max_size=6), max_size=12))
def test_intake_plan_fast_path_agrees_with_the_range_search(
        groups: list[list[tuple[str, int, int]]]) -> None:
    intake = Intake(NodeMarks(max_ranges=1000))
    for group in groups:
        # Batches decoded as the server decodes them, and built from lists, side by side.
        arrivals = [(b"p", batch(node, first, n, decoded=i % 2 == 0))
                    for i, (node, first, n) in enumerate(group)]
        expected = _reference_plan(intake.marks, arrivals)
        plan = intake.plan(arrivals)
        assert [(pb.new, pb.stored_before, pb.skipped_ahead)
                for pb in plan.batches] == expected
        assert list(plan.records) == [
            wire.encode_log_record(b.node, lo + i, b.readings[lo - b.first + i])
            for (_, b), (new, _, _) in zip(arrivals, expected, strict=True)
            for lo, hi in new for i in range(hi - lo + 1)]
        intake.committed(plan)
