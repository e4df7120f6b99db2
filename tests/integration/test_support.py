"""The live-stream checker used by the end-to-end tests catches what it must catch."""

from __future__ import annotations

import pytest
from support.devices import check_live_stream

pytestmark = pytest.mark.unit

Frame = dict[str, object]


def reading(seq: int, source: str = "m") -> Frame:
    return {"event": "reading", "source": source, "seq": seq}


def upstream(first: int, last: int, source: str = "m") -> Frame:
    return {"event": "gap", "reason": "upstream", "source": source, "from_seq": first,
            "to_seq": last, "missed": last - first + 1}


def slow(missed: int) -> Frame:
    return {"event": "gap", "reason": "slow_client", "missed": missed}


def test_announced_gaps_pass_and_are_counted() -> None:
    totals = check_live_stream([[reading(1), reading(2), upstream(3, 4), reading(5), slow(2),
                                 reading(8)]])
    assert totals == {"readings": 4, "jumps": 2, "upstream_missed": 2, "slow_missed": 2}


def test_each_connection_is_checked_on_its_own() -> None:
    # A reconnect starts afresh: readings missed while away are not a gap.
    assert check_live_stream([[reading(1)], [reading(9)]])["readings"] == 2


def test_slow_gaps_are_shared_between_sources() -> None:
    frames = [reading(1, "a"), reading(1, "b"), slow(3), reading(3, "a"), reading(3, "b")]
    assert check_live_stream([frames])["slow_missed"] == 3


@pytest.mark.parametrize("frames", [
    [reading(1), reading(3)],  # silent loss
    [reading(1), slow(1), reading(4)],  # loss larger than announced
    [reading(1), slow(3), reading(3)],  # announced more than was lost (one source)
    [reading(2), reading(1)],  # out of order
    [reading(2), reading(2)],  # duplicate
    [reading(1), upstream(3, 3), reading(4)],  # gap frame with the wrong range
], ids=["silent", "under-announced", "over-announced", "order", "duplicate", "range"])
def test_violations_are_caught(frames: list[Frame]) -> None:
    with pytest.raises(AssertionError):
        check_live_stream([frames])
