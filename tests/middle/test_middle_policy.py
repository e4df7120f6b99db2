"""Sans-I/O tests of the policy the middle's shell delegates to its cores.

The group-commit fallback (``Intake.commit``), what a feed delivery does when the log read
comes back short or without the lease's start (``FeedCore.fit_read``), and the wire pieces
the middle's hot path shares with the wire format's own encoders.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotpipe import wire
from iotpipe.middle.core import FeedCore, Intake, IntakePlan, NodeMarks, Reply

pytestmark = pytest.mark.unit


def reading(device: str, n: int) -> bytes:
    return wire.encode_reading(device, f"m{n}", n, b'{"v":1}', n)


def batch(node: str, first: int, n: int) -> wire.Batch:
    return wire.Batch(node, first, [reading("dev", first + i) for i in range(n)])


class FakeLog:
    """A log that holds ``room`` more records; an append that does not fit stores nothing."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.appends: list[list[tuple[str, int]]] = []

    def append(self, plan: IntakePlan) -> str | None:
        if len(plan.records) > self.room:
            return "log full"
        self.room -= len(plan.records)
        self.appends.append([wire.decode_log_record(r)[:2] for r in plan.records])
        return None

    def stored(self) -> list[tuple[str, int]]:
        return [key for append in self.appends for key in append]


def answers(replies: list[Reply]) -> list[tuple[bytes, str, int]]:
    """(peer, "ack" | "busy", last or first) per reply, in order."""
    out = []
    for reply in replies:
        if wire.message_kind(reply.frames) == wire.KIND_ACK:
            ack = wire.decode_ack(reply.frames)
            out.append((reply.peer, "ack", ack.last))
        else:
            busy = wire.decode_busy(reply.frames)
            out.append((reply.peer, "busy", busy.first))
    return out


def test_a_group_that_fits_is_one_append() -> None:
    intake, log = Intake(NodeMarks()), FakeLog(room=100)
    arrivals = [(b"a", batch("n1", 1, 3)), (b"b", batch("n2", 1, 2)), (b"a", batch("n1", 4, 2))]
    replies = intake.commit(arrivals, log.append, retry_ms=50)
    assert answers(replies) == [(b"a", "ack", 3), (b"b", "ack", 2), (b"a", "ack", 5)]
    assert len(log.appends) == 1
    assert log.stored() == [("n1", 1), ("n1", 2), ("n1", 3), ("n2", 1), ("n2", 2),
                            ("n1", 4), ("n1", 5)]
    assert intake.marks.high_water("n1") == 5 and intake.marks.high_water("n2") == 2


def test_a_group_that_does_not_fit_stores_batches_in_order_until_one_does_not() -> None:
    intake, log = Intake(NodeMarks()), FakeLog(room=6)
    arrivals = [(b"a", batch("n1", 1, 3)), (b"b", batch("n2", 1, 2)),
                (b"a", batch("n1", 4, 3)), (b"b", batch("n2", 3, 1))]
    replies = intake.commit(arrivals, log.append, retry_ms=50)
    # 3 + 2 fit, the third batch (3 records) does not: it and everything after it is busy,
    # even the last batch that alone would fit, so node n2's batches stay in order too.
    assert answers(replies) == [(b"a", "ack", 3), (b"b", "ack", 2),
                                (b"a", "busy", 4), (b"b", "busy", 3)]
    assert log.appends == [[("n1", 1), ("n1", 2), ("n1", 3)], [("n2", 1), ("n2", 2)]]
    assert intake.marks.high_water("n1") == 3 and intake.marks.high_water("n2") == 2
    busy = [wire.decode_busy(r.frames) for r in replies[2:]]
    assert {(b.retry_ms, b.reason) for b in busy} == {(50, "log full")}
    assert intake.counters.busy == 2 and intake.counters.records == 5


def test_a_refused_group_still_acks_what_was_already_stored() -> None:
    intake, log = Intake(NodeMarks()), FakeLog(room=4)
    intake.commit([(b"a", batch("n1", 1, 4))], log.append, retry_ms=10)
    # A resend of stored readings behind a batch that does not fit: the resend is acked.
    arrivals = [(b"a", batch("n1", 5, 2)), (b"a", batch("n1", 1, 4))]
    replies = intake.commit(arrivals, log.append, retry_ms=10)
    assert answers(replies) == [(b"a", "busy", 5), (b"a", "ack", 4)]
    assert intake.marks.high_water("n1") == 4


def test_a_single_batch_that_does_not_fit_is_busy_and_appended_once() -> None:
    calls: list[int] = []

    def refuse(plan: IntakePlan) -> str | None:
        calls.append(len(plan.records))
        return "reading too large for the log"

    intake = Intake(NodeMarks())
    replies = intake.commit([(b"a", batch("n1", 1, 2))], refuse, retry_ms=10)
    assert answers(replies) == [(b"a", "busy", 1)]
    assert wire.decode_busy(replies[0].frames).reason == "reading too large for the log"
    assert calls == [2]
    assert intake.marks.high_water("n1") == 0


def test_a_group_of_duplicates_is_acked_without_an_append() -> None:
    intake, log = Intake(NodeMarks()), FakeLog(room=10)
    intake.commit([(b"a", batch("n1", 1, 3))], log.append, retry_ms=10)
    log.room = 0  # even a full log acks what is already stored

    def no_append(plan: IntakePlan) -> str | None:
        raise AssertionError("a plan without records must not be appended")

    replies = intake.commit([(b"a", batch("n1", 1, 3)), (b"b", batch("n1", 2, 2))],
                            no_append, retry_ms=10)
    assert answers(replies) == [(b"a", "ack", 3), (b"b", "ack", 3)]
    assert intake.counters.duplicates == 5


class PlacingLog:
    """A log with ``room`` records whose placed records become durable only when told."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.placed: list[tuple[str, int]] = []  # (node, node seq) per log seq - 1
        self.durable = 0

    def place(self, plan: IntakePlan) -> int | str:
        if len(plan.records) > self.room:
            return "log full"
        self.room -= len(plan.records)
        self.placed += [wire.decode_log_record(r)[:2] for r in plan.records]
        return len(self.placed)

    def stored(self) -> list[tuple[str, int]]:
        return self.placed[:self.durable]


def test_acks_wait_for_the_write_that_makes_their_records_durable() -> None:
    intake, log = Intake(NodeMarks()), PlacingLog(room=100)
    assert intake.take([(b"a", batch("n1", 1, 3)), (b"b", batch("n2", 1, 2))], log.place,
                       retry_ms=10) == []
    assert intake.held == 1
    assert intake.durable(4) == []  # the group's last record (5) is not durable yet
    assert intake.marks.high_water("n1") == 0  # marks are adopted with durability only
    assert answers(intake.durable(5)) == [(b"a", "ack", 3), (b"b", "ack", 2)]
    assert intake.marks.high_water("n1") == 3 and intake.held == 0


def test_a_resend_while_its_first_copy_is_in_flight_is_stored_once_and_waits_for_it() -> None:
    intake, log = Intake(NodeMarks()), PlacingLog(room=100)
    intake.take([(b"a", batch("n1", 1, 3))], log.place, retry_ms=10)
    # The same batch again (ingest timed out and resent) and a new one behind it.
    intake.take([(b"a", batch("n1", 1, 3)), (b"a", batch("n1", 4, 2))], log.place,
                retry_ms=10)
    assert log.placed == [("n1", 1), ("n1", 2), ("n1", 3), ("n1", 4), ("n1", 5)]
    assert answers(intake.durable(3)) == [(b"a", "ack", 3)]  # only the first group
    assert answers(intake.durable(5)) == [(b"a", "ack", 3), (b"a", "ack", 5)]
    assert intake.counters.duplicates == 3


def test_a_refusal_is_answered_at_once_while_placed_batches_wait() -> None:
    intake, log = Intake(NodeMarks()), PlacingLog(room=4)
    replies = intake.take([(b"a", batch("n1", 1, 3)), (b"b", batch("n2", 1, 3))], log.place,
                          retry_ms=10)
    assert answers(replies) == [(b"b", "busy", 1)]  # the first fit alone, the second not
    assert answers(intake.durable(3)) == [(b"a", "ack", 3)]


@given(st.lists(st.tuples(st.lists(st.tuples(st.sampled_from(["n1", "n2"]),
                                             st.integers(1, 30), st.integers(1, 6)),
                                   min_size=1, max_size=5),
                          st.integers(0, 12)), min_size=1, max_size=8),
       st.integers(0, 60))
def test_pipelined_intake_stores_each_seq_once_and_acks_only_durable_records(
        rounds: list[tuple[list[tuple[str, int, int]], int]], room: int) -> None:
    intake, log = Intake(NodeMarks()), PlacingLog(room=room)
    sent = 0
    answered: list[tuple[wire.Batch, str]] = []
    batches: dict[bytes, wire.Batch] = {}

    def note(replies: list[Reply]) -> None:
        for (peer, kind, _) in answers(replies):
            answered.append((batches[peer], kind))
            if kind == "ack":
                b = batches[peer]
                durable = set(log.stored())
                assert all((b.node, s) in durable for s in range(b.first, b.last + 1))

    for sends, advance in rounds:
        arrivals = []
        for node, first, n in sends:
            peer = str(sent).encode()  # one peer per batch, to match answers to batches
            sent += 1
            batches[peer] = batch(node, first, n)
            arrivals.append((peer, batches[peer]))
        note(intake.take(arrivals, log.place, retry_ms=10))
        log.durable = min(len(log.placed), log.durable + advance)
        note(intake.durable(log.durable))
    log.durable = len(log.placed)
    note(intake.durable(log.durable))
    assert len(log.placed) == len(set(log.placed))  # no node seq stored twice
    assert len(answered) == sent and intake.held == 0  # every batch answered once


@given(st.lists(st.tuples(st.sampled_from(["n1", "n2"]), st.integers(1, 30),
                          st.integers(1, 6)), min_size=1, max_size=12),
       st.integers(0, 40))
def test_commit_stores_each_seq_at_most_once_and_acks_only_stored(
        sends: list[tuple[str, int, int]], room: int) -> None:
    intake, log = Intake(NodeMarks()), FakeLog(room=room)
    arrivals = [(node.encode(), batch(node, first, n)) for node, first, n in sends]
    replies = intake.commit(arrivals, log.append, retry_ms=10)
    assert len(replies) == len(arrivals)
    stored = log.stored()
    assert len(stored) == len(set(stored))
    for (_, b), (_, kind, _) in zip(arrivals, answers(replies), strict=True):
        if kind == "ack":
            assert all((b.node, s) in stored for s in range(b.first, b.last + 1))
    # marks are exactly what reached the log
    for node in ("n1", "n2"):
        marked = {s for a, z in intake.marks.get(node) for s in range(a, z + 1)}
        assert marked == {s for n, s in stored if n == node}


# -- feed deliveries against what the log read returned ----------------------------------


def feed_with_lease(tail: int, credit: int = 10) -> tuple[FeedCore, object]:
    core = FeedCore({"storage": 0}, max_records=8)
    core.on_request(b"A", wire.FeedRequest("storage", "c1", credit, []), now=0, tail=tail)
    lease = core.next_delivery(0, tail)
    assert lease is not None
    return core, lease


def test_fit_read_a_full_read_keeps_the_lease() -> None:
    core, lease = feed_with_lease(tail=20)
    assert core.fit_read(lease, 1, 8, tail=20) is None
    assert (lease.first, lease.last) == (1, 8)
    assert core.consumer("storage", "c1").outstanding == 8


def test_fit_read_a_short_read_shrinks_the_lease_and_the_rest_is_delivered_next() -> None:
    core, lease = feed_with_lease(tail=20)
    assert core.fit_read(lease, 1, 3, tail=20) is None  # e.g. the byte budget was hit
    assert (lease.first, lease.last) == (1, 3)
    following = core.next_delivery(0, 20)
    assert following is not None and (following.first, following.last) == (4, 8)


def test_fit_read_nothing_read_skips_the_whole_lease() -> None:
    core, lease = feed_with_lease(tail=20)
    assert core.fit_read(lease, None, 0, tail=20) == (1, 8)
    assert core.leases("storage") == []
    assert core.cursor("storage") == 8  # treated as done: the feed never spins on it
    assert core.consumer("storage", "c1").outstanding == 0
    following = core.next_delivery(0, 20)
    assert following is not None and following.first == 9


def test_fit_read_a_read_that_starts_later_skips_only_the_missing_start() -> None:
    core, lease = feed_with_lease(tail=20)
    assert core.fit_read(lease, 6, 8, tail=20) == (1, 5)
    assert core.cursor("storage") == 5
    following = core.next_delivery(0, 20)
    assert following is not None and following.first == 6


# -- the wire pieces the hot path shares ---------------------------------------------------


@given(st.text(min_size=1, max_size=40), st.integers(1, 2**40),
       st.lists(st.binary(max_size=300), min_size=1, max_size=20))
def test_encode_log_records_equals_one_record_at_a_time(node: str, first: int,
                                                        readings: list[bytes]) -> None:
    assert wire.encode_log_records(node, first, readings) == [
        wire.encode_log_record(node, seq, r) for seq, r in enumerate(readings, first)]


@given(st.text(max_size=80), st.integers(0, 2**63 - 1))
def test_live_meta_pieces_build_encode_live(middle_id: str, seq: int) -> None:
    frames = wire.encode_live("dev-1", middle_id, seq, b"r")
    prefix = wire.live_meta_prefix(middle_id)
    assert frames[1] == wire.live_meta(prefix, seq) == next(wire.live_metas(prefix, seq))
    event = wire.decode_live(frames)
    assert (event.middle_id, event.seq) == (middle_id, seq)


def test_live_metas_count_up_from_first() -> None:
    prefix = wire.live_meta_prefix("m1")
    metas = wire.live_metas(prefix, 126)
    assert [wire.decode_live([b"d", next(metas), b"r"]).seq for _ in range(4)] == [126, 127,
                                                                                 128, 129]


# -- feed delivery format: v2 for consumers that read it, v1 for the others ----------------


def test_records_v2_is_one_frame_and_decodes_like_v1() -> None:
    records = [b"a", b"bc", b""]
    v2 = wire.encode_records("storage", "m1", 7, records, version=2)
    v1 = wire.encode_records("storage", "m1", 7, records)
    assert len(v2) == 3 and v2[0] == wire.KIND_RECORDS_V2
    assert len(v1) == 5 and v1[0] == wire.KIND_RECORDS
    assert wire.decode_records(v2) == wire.decode_records(v1) == wire.Records(
        "storage", "m1", 7, records)


def test_records_v2_malformed_bodies_are_rejected() -> None:
    header = wire.encode_records("g", "m", 1, [b"a"])[1]
    with pytest.raises(wire.WireError, match="array of bin"):
        wire.decode_records([wire.KIND_RECORDS_V2, header, msgpack.packb(["a"])])
    with pytest.raises(wire.WireError, match="3 frames"):
        wire.decode_records([wire.KIND_RECORDS_V2, header, msgpack.packb([b"a"]), b"x"])
    with pytest.raises(wire.WireError, match="header says 1"):
        wire.decode_records([wire.KIND_RECORDS_V2, header, msgpack.packb([b"a", b"b"])])


def test_feed_request_version_defaults_to_v1_for_consumers_that_send_none() -> None:
    old = [wire.KIND_FEED, msgpack.packb({"group": "g", "consumer": "c", "credit": 5,
                                          "acks": [[1, 2]]})]
    assert wire.decode_feed_request(old).records_version == 1
    assert wire.decode_feed_request(wire.encode_feed_request("g", "c", 5)).records_version == 2
    assert wire.decode_feed_request(
        wire.encode_feed_request("g", "c", 5, records_version=1)).records_version == 1
    bad = [wire.KIND_FEED, msgpack.packb({"group": "g", "consumer": "c", "credit": 5,
                                          "acks": [], "v": 0})]
    with pytest.raises(wire.WireError, match="'v'"):
        wire.decode_feed_request(bad)


def test_feed_delivers_in_the_format_of_the_consumers_latest_request() -> None:
    core = FeedCore({"storage": 0}, max_records=4)
    core.on_request(b"A", wire.FeedRequest("storage", "old", 4, [], 1), now=0, tail=20)
    core.on_request(b"B", wire.FeedRequest("storage", "new", 4, []), now=0, tail=20)
    leases = {lease.consumer: lease for lease in iter(lambda: core.next_delivery(0, 20), None)}
    assert core.records_version(leases["old"]) == 1
    assert core.records_version(leases["new"]) == 2
    # an upgraded consumer says so in its next request
    core.on_request(b"A", wire.FeedRequest("storage", "old", 4, [], 2), now=1, tail=20)
    assert core.records_version(leases["old"]) == 2
    core.peer_gone(b"A")  # a lease whose consumer is gone gets the format every consumer reads
    assert core.records_version(leases["old"]) == 1
