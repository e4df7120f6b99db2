"""The middle's C encoding (``_hot.c``) against ``iotpipe.wire``'s Python, byte for byte.

The C module is what every group runs; ``hot``'s Python twins are the fallback for installs
without a compiler. Same bytes, same readings left out, same errors.
"""

from __future__ import annotations

from types import ModuleType

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.cmodules import c_module

from iotpipe import wire
from iotpipe.middle import hot

pytestmark = pytest.mark.unit


def _c_module() -> ModuleType:
    return c_module("iotpipe.middle._hot")


def test_c_module_is_built_and_used() -> None:
    c = _c_module()
    assert hot.BUILT
    assert hot.log_records is c.log_records and hot.live_frames is c.live_frames


# Sizes around every msgpack header boundary: fixstr/str8/str16, bin8/bin16/bin32,
# fixint/uint8/uint16/uint32/uint64.
NAMES = st.one_of(st.text(max_size=40), st.sampled_from(["", "n" * 31, "n" * 32, "é" * 200,
                                                         "x" * 255, "x" * 256, "x" * 70_000]))
SEQS = st.one_of(st.integers(1, 2**64 - 600),
                 st.sampled_from([1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32,
                                  2**64 - 513]))
BLOBS = st.lists(st.one_of(st.binary(max_size=300),
                           st.sampled_from([b"", b"r" * 255, b"r" * 256, b"r" * 65_536])),
                 max_size=12)


@given(NAMES, SEQS, BLOBS)
def test_log_records_match_wire(node: str, first: int, readings: list[bytes]) -> None:
    c = _c_module()
    expected = wire.encode_log_records(node, first, readings)
    assert c.log_records(node, first, readings) == expected
    assert hot._log_records_py(node, first, readings) == expected


def readings_strategy() -> st.SearchStrategy[list[bytes]]:
    real = st.builds(lambda d, n: wire.encode_reading(d, f"m{n}", n, b"{}", n),
                     NAMES, st.integers(0, 2**40))
    junk = st.one_of(st.binary(max_size=40), st.just(b"\x95"), st.just(b"\x95\xd9"),
                     st.just(b"\x95\xa5ab"), st.just(b"\x94\xa1a"))
    return st.lists(st.one_of(real, junk), max_size=12)


@given(st.text(max_size=40), SEQS, readings_strategy())
def test_live_frames_match_wire(middle_id: str, first: int, readings: list[bytes]) -> None:
    c = _c_module()
    prefix = wire.live_meta_prefix(middle_id)
    expected = hot._live_frames_py(prefix, first, readings)
    assert c.live_frames(prefix, first, readings) == expected
    # each event carries encode_live's meta for the seq of its reading's position
    publishable = [(seq, r) for seq, r in enumerate(readings, first)
                   if wire.reading_topic(r) is not None]
    assert len(expected) == len(publishable)
    for (topic, meta, reading), (seq, original) in zip(expected, publishable, strict=True):
        assert reading is original and topic == wire.reading_topic(reading)
        assert meta == wire.encode_live("d", middle_id, seq, reading)[1]


def test_errors_are_the_pythons_kinds() -> None:
    c = _c_module()
    with pytest.raises(TypeError):
        c.log_records("n", 1, [b"a", "b"])
    with pytest.raises(TypeError):
        c.live_frames(b"p", 1, [b"a", 3])
    with pytest.raises(OverflowError):
        c.log_records("n", -1, [b"a"])
    assert c.log_records("n", 5, []) == [] and c.live_frames(b"p", 5, []) == []
    assert msgpack.unpackb(c.log_records("nödé", 2**40, [b"\x00"])[0]) == ["nödé", 2**40,
                                                                           b"\x00"]
