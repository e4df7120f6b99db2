"""``WriteCoalescer``: which woken relay clients are written now and which wait (sans-I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotpipe.relay.sending import WriteCoalescer

pytestmark = pytest.mark.unit


def test_a_client_with_enough_frames_is_written_at_once() -> None:
    coalescer = WriteCoalescer(flush_frames=64, flush_interval=0.005)
    assert coalescer.woken("a", 64, 1.0)
    assert coalescer.woken("b", 500, 1.0)
    assert coalescer.due(1.0, drained=True) == []  # nothing was left waiting


def test_a_client_with_few_frames_waits_for_the_socket_to_run_dry() -> None:
    coalescer = WriteCoalescer(flush_frames=64, flush_interval=0.005)
    assert not coalescer.woken("a", 3, 1.0)
    assert not coalescer.woken("b", 1, 1.001)
    assert coalescer.due(1.002, drained=False) == []  # more is coming, the wait is short
    assert not coalescer.woken("a", 6, 1.003)  # woken again: still one write owed
    assert sorted(coalescer.due(1.004, drained=True)) == ["a", "b"]
    assert coalescer.due(1.004, drained=True) == []  # each owed write is handed out once


def test_under_a_flood_nobody_waits_longer_than_the_interval() -> None:
    coalescer = WriteCoalescer(flush_frames=64, flush_interval=0.005)
    assert not coalescer.woken("a", 1, 2.0)
    assert not coalescer.woken("b", 1, 2.004)
    # The socket never runs dry: the oldest wait decides.
    assert coalescer.due(2.0049, drained=False) == []
    assert sorted(coalescer.due(2.0051, drained=False)) == ["a", "b"]
    # The clock restarts with the next client that waits, not with the first ever.
    assert not coalescer.woken("b", 2, 2.006)
    assert coalescer.due(2.010, drained=False) == []
    assert coalescer.due(2.0111, drained=False) == ["b"]


def test_a_client_that_fills_up_while_waiting_is_written_then_not_again() -> None:
    coalescer = WriteCoalescer(flush_frames=64, flush_interval=0.005)
    assert not coalescer.woken("a", 10, 1.0)
    assert coalescer.woken("a", 80, 1.001)  # written now, with everything that waited
    assert coalescer.due(1.002, drained=True) == []


@given(st.lists(st.tuples(st.sampled_from("abcde"), st.integers(1, 200),
                          st.floats(0, 0.02), st.booleans()), max_size=60))
def test_every_woken_client_is_written_once_at_most_interval_later(
        steps: list[tuple[str, int, float, bool]]) -> None:
    """Whatever the sequence of bursts: a woken client is written at once or handed out by
    ``due`` no later than the interval after its wait began (or the socket ran dry), and is
    never handed out twice for one wait."""
    interval = 0.005
    coalescer = WriteCoalescer(flush_frames=64, flush_interval=interval)
    now = 0.0
    waiting_since: dict[str, float] = {}
    for client, pending, advance, drained in steps:
        now += advance
        if coalescer.woken(client, pending, now):
            waiting_since.pop(client, None)
        else:
            waiting_since.setdefault(client, now)
        due = coalescer.due(now, drained)
        assert len(due) == len(set(due))
        assert set(due) <= set(waiting_since)
        oldest = min(waiting_since.values(), default=now)
        if drained or now - oldest >= interval:
            assert set(due) == set(waiting_since)  # nobody left behind
            waiting_since.clear()
        else:
            assert due == []
