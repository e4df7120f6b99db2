"""The middle's live publishing policy (sans-I/O): group messages and the PUB bound."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotpipe import wire
from iotpipe.middle.core import group_messages, pub_sndhwm

pytestmark = pytest.mark.unit


@given(st.integers(1, 2**40), st.lists(st.binary(max_size=8), min_size=1, max_size=100),
       st.integers(1, 40))
def test_group_messages_cover_the_group_in_order_within_the_cap(
        first: int, readings: list[bytes], cap: int) -> None:
    groups = [wire.decode_live_group(m) for m in group_messages("m0", first, readings, cap)]
    assert all(0 < len(g.readings) <= cap and g.middle_id == "m0" for g in groups)
    assert [g.first for g in groups] == list(range(first, first + len(readings), cap))
    assert [r for g in groups for r in g.readings] == readings


def test_small_group_is_one_message_with_encode_live_group_bytes() -> None:
    assert group_messages("m0", 3, [b"a", b"b"], 2) == [wire.encode_live_group("m0", 3,
                                                                                [b"a", b"b"])]


@pytest.mark.parametrize(("hwm", "fmt", "cap", "expected"), [
    (100_000, "v1", 256, 100_000),   # v1: one message per record
    (100_000, "v2", 256, 391),       # ~pub_hwm records in full messages
    (50, "v2", 256, 1),              # never 0 (ZeroMQ reads 0 as unlimited)
    (512, "v2", 256, 2),
])
def test_pub_bound_holds_about_pub_hwm_records(hwm: int, fmt: str, cap: int,
                                               expected: int) -> None:
    assert pub_sndhwm(hwm, fmt, cap) == expected  # type: ignore[arg-type]

