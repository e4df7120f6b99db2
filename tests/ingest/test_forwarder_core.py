"""Forwarder core without sockets: window, acks, busy go-back-N, timeout failover."""

from __future__ import annotations

import pytest

from iotpipe.protocol import ForwarderCore, preferred_endpoint
from iotpipe.wire import decode_batch, encode_ack, encode_busy

pytestmark = pytest.mark.unit

NODE = "ingest-0-p0"


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [f"r{start + i}".encode() for i in range(n)]


def make(n_endpoints: int = 2, **kwargs: float) -> ForwarderCore:
    return ForwarderCore(NODE, n_endpoints, next_seq=1, **kwargs)  # type: ignore[arg-type]


def test_preferred_endpoint_is_stable_and_spread() -> None:
    assert preferred_endpoint(NODE, 3) == preferred_endpoint(NODE, 3)
    chosen = {preferred_endpoint(f"ingest-{i}-p0", 3) for i in range(30)}
    assert chosen == {0, 1, 2}
    assert make(1).endpoint == 0


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
        ForwarderCore(NODE, 0, next_seq=1)
    with pytest.raises(ValueError, match="window"):
        ForwarderCore(NODE, 1, next_seq=1, window=0)
    core = make()
    with pytest.raises(ValueError, match="empty"):
        core.add(1, [], 0.0)
