"""Forwarder core without sockets: window, acks, busy go-back-N, timeout failover."""

from __future__ import annotations

import pytest

from iotpipe.ingest.core import ForwarderCore, preferred_endpoint
from iotpipe.wire import decode_batch, encode_ack, encode_busy

pytestmark = pytest.mark.unit

NODE = "ingest-0-p0"


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [f"r{start + i}".encode() for i in range(n)]


def names(n: int) -> list[str]:
    return [f"tcp://middle-{i}.middle:5555" for i in range(n)]


def make(n_endpoints: int = 2, **kwargs: float) -> ForwarderCore:
    return ForwarderCore(NODE, names(n_endpoints), next_seq=1, **kwargs)  # type: ignore[arg-type]


def test_preferred_endpoint_is_stable_and_spread() -> None:
    assert preferred_endpoint(NODE, names(3)) == preferred_endpoint(NODE, names(3))
    chosen = {preferred_endpoint(f"ingest-{i}-p0", names(3)) for i in range(30)}
    assert chosen == {0, 1, 2}
    assert make(1).endpoint == 0
    # Independent of the order of the list: the same endpoint name wins.
    three = names(3)
    assert three[preferred_endpoint(NODE, three)] == \
        three[::-1][preferred_endpoint(NODE, three[::-1])]


def test_adding_an_endpoint_moves_only_the_nodes_it_wins() -> None:
    nodes = [f"ingest-{i}-p{j}~0123456789abcdef" for i in range(40) for j in range(2)]
    before = {n: names(2)[preferred_endpoint(n, names(2))] for n in nodes}
    after = {n: names(3)[preferred_endpoint(n, names(3))] for n in nodes}
    moved = [n for n in nodes if before[n] != after[n]]
    # Every node that moves, moves to the new endpoint (rendezvous hashing) ...
    assert moved and all(after[n] == names(3)[2] for n in moved)
    # ... and about a third of them do (not all, as a modulo hash would move).
    assert len(nodes) // 6 < len(moved) < len(nodes) // 2


def test_set_endpoints_keeps_the_node_when_its_endpoint_stays_preferred() -> None:
    core = make(n_endpoints=2, window=4)
    home_name = core.endpoints[core.endpoint]
    core.add(1, payloads(2), 0.0)
    # A new endpoint this node does not prefer: nothing is resent, indices follow names.
    other = next(f"tcp://extra-{i}:5555" for i in range(100)
                 if preferred_endpoint(NODE, [home_name, f"tcp://extra-{i}:5555"]) == 0)
    new = [other, *core.endpoints]
    assert core.set_endpoints(new, 0.1) == []
    assert core.endpoints[core.endpoint] == home_name
    assert core.inflight[0].endpoint == core.endpoint
    assert core.stats.moves == 0
    assert core.on_reply(core.endpoint, encode_ack(NODE, 2), 0.2) == 2


def test_removing_the_current_endpoint_resends_every_unacked_batch_in_order() -> None:
    core = make(n_endpoints=2, window=4, ack_timeout=10.0)
    home_name = core.endpoints[core.endpoint]
    core.add(1, payloads(2), 0.0)
    core.add(3, payloads(2, 2), 0.0)
    core.add(5, payloads(2, 4), 0.0)
    assert core.on_reply(core.endpoint, encode_ack(NODE, 4), 0.1) is None  # 1-2 still open
    remaining = [n for n in core.endpoints if n != home_name]
    sends = core.set_endpoints(remaining, 0.2)
    assert core.endpoints == remaining and core.endpoint == 0
    assert [(s.endpoint, decode_batch(s.frames).first) for s in sends] == [(0, 1), (0, 5)]
    assert core.stats.moves == 1 and core.stats.batches_resent == 2
    assert core.on_reply(0, encode_ack(NODE, 2), 0.3) == 4
    assert core.on_reply(0, encode_ack(NODE, 6), 0.3) == 6
    with pytest.raises(ValueError, match="at least one"):
        core.set_endpoints([], 0.4)
    with pytest.raises(ValueError, match="duplicate"):
        core.set_endpoints([remaining[0], remaining[0]], 0.4)


def test_window_limits_batches_in_flight_and_acks_advance_in_order() -> None:
    core = make(window=2)
    home = core.endpoint
    send1 = core.add(1, payloads(3), 0.0)
    assert send1.endpoint == home
    batch = decode_batch(send1.frames)
    assert (batch.node, batch.first, batch.readings) == (NODE, 1, payloads(3))
    core.add(4, payloads(2, 3), 0.0)
    assert not core.can_send(0.0)
    assert core.in_flight_records == 5
    # Out-of-order ack: batch 2 acked first does not move the queue cursor.
    assert core.on_reply(home, encode_ack(NODE, 5), 0.1) is None
    assert core.on_reply(home, encode_ack(NODE, 3), 0.1) == 5
    assert core.acked_through == 5
    assert core.idle() and core.can_send(0.1)
    with pytest.raises(ValueError, match="expected 6"):
        core.add(9, payloads(1), 0.2)


def test_duplicate_foreign_and_garbage_replies_are_ignored() -> None:
    core = make()
    core.add(1, payloads(2), 0.0)
    assert core.on_reply(core.endpoint, encode_ack("other-node", 2), 0.0) is None
    assert core.on_reply(core.endpoint, [b"junk"], 0.0) is None
    assert core.on_reply(core.endpoint, [b"iotpipe.ack.v1", b"\xc1"], 0.0) is None
    assert core.stats.bad_replies == 3
    assert core.on_reply(core.endpoint, encode_ack(NODE, 2), 0.0) == 2
    assert core.on_reply(core.endpoint, encode_ack(NODE, 2), 0.0) is None
    assert core.stats.stale_replies == 1


def test_timeout_fails_over_and_resends_all_unacked_from_the_lowest() -> None:
    core = make(n_endpoints=3, window=4, ack_timeout=1.0)
    home = core.endpoint
    core.add(1, payloads(2), 0.0)
    core.add(3, payloads(2, 2), 0.1)
    core.add(5, payloads(2, 4), 0.2)
    core.on_reply(home, encode_ack(NODE, 4), 0.3)  # the middle batch got acked
    assert core.poll(0.9) == []
    assert core.next_deadline() == pytest.approx(1.0)
    sends = core.poll(1.0)
    assert core.endpoint == (home + 1) % 3
    assert [s.endpoint for s in sends] == [core.endpoint, core.endpoint]
    assert [decode_batch(s.frames).first for s in sends] == [1, 5]
    assert core.stats.failovers == 1 and core.stats.batches_resent == 2
    # A late ack from the old middle still counts: it stored the batch.
    assert core.on_reply(home, encode_ack(NODE, 2), 1.1) == 4
    assert core.on_reply(core.endpoint, encode_ack(NODE, 6), 1.2) == 6
    assert core.idle() and core.next_deadline() is None


def test_failover_wraps_around_with_one_endpoint() -> None:
    core = make(n_endpoints=1, ack_timeout=0.5)
    core.add(1, payloads(1), 0.0)
    sends = core.poll(0.6)
    assert [(s.endpoint, decode_batch(s.frames).first) for s in sends] == [(0, 1)]
    assert core.poll(0.7) == []  # the resend restarted the timer


def test_busy_pauses_then_resends_from_the_refused_batch_in_order() -> None:
    core = make(window=4, ack_timeout=10.0)
    home = core.endpoint
    core.add(1, payloads(2), 0.0)
    core.add(3, payloads(2, 2), 0.0)
    core.add(5, payloads(2, 4), 0.0)
    assert core.on_reply(home, encode_ack(NODE, 2), 0.01) == 2
    core.on_reply(home, encode_busy(NODE, 3, 200, "log full"), 0.01)
    assert core.stats.busy_replies == 1
    assert not core.can_send(0.1)
    assert core.poll(0.1) == []
    assert core.next_deadline() == pytest.approx(0.21)
    sends = core.poll(0.25)
    assert [(s.endpoint, decode_batch(s.frames).first) for s in sends] == [(home, 3), (home, 5)]
    assert core.can_send(0.25)
    # A busy for a batch that is not in flight (stale) changes nothing.
    core.on_reply(home, encode_busy(NODE, 99, 200, "log full"), 0.3)
    assert core.can_send(0.3)
    assert core.on_reply(home, encode_ack(NODE, 4), 0.3) == 4
    assert core.on_reply(home, encode_ack(NODE, 6), 0.3) == 6


def test_ack_during_busy_pause_moves_the_resend_point() -> None:
    core = make(window=4, ack_timeout=10.0)
    home = core.endpoint
    core.add(1, payloads(1), 0.0)
    core.add(2, payloads(1, 1), 0.0)
    core.on_reply(home, encode_busy(NODE, 1, 100, "log full"), 0.0)
    core.on_reply(home, encode_ack(NODE, 1), 0.05)  # a late ack for the first one after all
    sends = core.poll(0.2)
    assert [decode_batch(s.frames).first for s in sends] == [2]


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        ForwarderCore(NODE, [], next_seq=1)
    with pytest.raises(ValueError, match="window"):
        ForwarderCore(NODE, names(1), next_seq=1, window=0)
    core = make()
    with pytest.raises(ValueError, match="empty"):
        core.add(1, [], 0.0)
