"""The C record parser (``_framing.parse_records``) against its pure-Python twin.

Every read and every recovery scan runs the C parser; the Python one is the fallback for
installs without a compiler and the reference here. On any buffer -- intact, torn, bit-flipped,
re-sequenced, zeroed -- and any limits, both must return the same ``ParseResult`` and append
the same records.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import google_crc32c
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from support.cmodules import c_module

from iotpipe.queue import PersistentQueue, framing, reader, segments
from iotpipe.queue.framing import (
    FIRST_IN_WRITE,
    ParseResult,
    Record,
    Stop,
    encode_records,
    parse_records_python,
)

pytestmark = pytest.mark.unit

LAST_SEQ = (1 << 64) - 1


def _c_module() -> ModuleType:
    return c_module("iotpipe.queue._framing")


def test_c_parser_is_built_and_used() -> None:
    module = _c_module()
    assert framing.parse_records is module.parse_records
    assert framing.PARSER == "c"


def _both(buf: Any, offset: int, end: int, seq: int, collect: bool,
          **limits: Any) -> tuple[object, list[Record] | None]:
    """Run both parsers; assert the same outcome (result and records, or the same error)."""
    outcomes = []
    for parse in (_c_module().parse_records, parse_records_python):
        out: list[Record] | None = [] if collect else None
        try:
            result: object = parse(buf, offset, end, seq, out, **limits)
        except (ValueError, TypeError) as exc:
            result = (type(exc), str(exc))
        outcomes.append((result, out))
    (c_result, c_out), (py_result, py_out) = outcomes
    assert c_result == py_result
    assert c_out == py_out
    if isinstance(c_result, ParseResult):
        assert type(c_result) is ParseResult and type(c_result.next_seq) is int
        assert c_result.stop is py_result.stop  # type: ignore[union-attr]  # the Stop constant itself
    for record in c_out or ():
        assert type(record) is Record and type(record.payload) is bytes
    return c_result, c_out


def _reframe(buf: bytearray, at: int, seq: int | None = None, flags: int | None = None) -> None:
    """Rewrite the header of the record at ``at`` (new seq/flags) with a valid CRC."""
    if at + 16 > len(buf):
        return
    _crc, length_flags, old_seq = struct.unpack_from("<IIQ", buf, at)
    length = length_flags & 0x7FFF_FFFF
    if at + length > len(buf) or length < 16:
        return
    if flags is not None:
        length_flags = length | flags
    struct.pack_into("<IQ", buf, at + 4, length_flags, old_seq if seq is None else seq)
    struct.pack_into("<I", buf, at, google_crc32c.value(bytes(buf[at + 4:at + length])))


def _record_offsets(payloads: list[bytes]) -> list[int]:
    offsets, at = [], 0
    for payload in payloads:
        offsets.append(at)
        at += framing.framed_size(len(payload))
    return offsets


CORRUPTIONS = st.lists(st.tuples(st.sampled_from(
    ["flip", "zero_run", "torn", "reseq", "flag", "bad_length", "huge_length", "garbage"]),
    st.integers(0, 1 << 16), st.integers(0, 1 << 16)), max_size=3)


@settings(max_examples=400, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=70), max_size=12),
    first_seq=st.one_of(st.integers(0, 1 << 20), st.integers(LAST_SEQ - 12, LAST_SEQ)),
    corruptions=CORRUPTIONS,
    start=st.integers(0, 16),
    end_cut=st.integers(0, 40),
    seq_shift=st.sampled_from([0, 0, 0, 1, -1, 1 << 64, -(1 << 70)]),
    collect=st.booleans(),
    max_records=st.one_of(st.just(1 << 62), st.integers(-2, 14), st.just(1 << 80)),
    max_bytes=st.one_of(st.just(1 << 62), st.integers(-5, 400), st.just(-(1 << 80))),
    at_least_one=st.booleans(),
)
def test_c_and_python_parsers_agree(payloads: list[bytes], first_seq: int,
                                    corruptions: list[tuple[str, int, int]], start: int,
                                    end_cut: int, seq_shift: int, collect: bool,
                                    max_records: int, max_bytes: int,
                                    at_least_one: bool) -> None:
    first_seq = min(first_seq, LAST_SEQ + 1 - max(len(payloads), 1))  # seqs up to the largest
    buf = bytearray(encode_records(payloads, first_seq) + bytes(24))
    offsets = _record_offsets(payloads) or [0]
    for kind, a, b in corruptions:
        if not buf:
            break
        at = offsets[a % len(offsets)]
        if kind == "flip":
            position = a % len(buf)
            buf[position] ^= 1 << (b % 8)
        elif kind == "zero_run":
            position = a % len(buf)
            buf[position:position + 1 + b % 40] = bytes(len(buf[position:position + 1 + b % 40]))
        elif kind == "torn":
            del buf[max(len(buf) - 1 - b % 64, 0):]
        elif kind == "reseq":
            _reframe(buf, at, seq=(first_seq + b % 5) % (1 << 64))
        elif kind == "flag":
            _reframe(buf, at, flags=FIRST_IN_WRITE if b % 2 else 0)
        elif kind == "bad_length" and at + 8 <= len(buf):
            struct.pack_into("<I", buf, at + 4, b % 16 | (FIRST_IN_WRITE if a % 2 else 0))
        elif kind == "huge_length" and at + 8 <= len(buf):
            struct.pack_into("<I", buf, at + 4, (b << 8) | 0x100)
        elif kind == "garbage":
            buf += bytes((a + i * b) % 256 for i in range(1 + b % 30))
    data = bytes(buf)
    # Record boundaries and arbitrary offsets alike.
    offset = offsets[start % len(offsets)] if start % 2 else start
    end = max(len(data) - end_cut, 0)
    seq = first_seq + (start % len(offsets) if start % 2 else 0) + seq_shift
    result, _out = _both(data, offset, end, seq, collect, max_records=max_records,
                         max_bytes=max_bytes, at_least_one=at_least_one)
    event(result.stop if isinstance(result, ParseResult) else "error")


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=50), min_size=1, max_size=8), st.integers(0, 1 << 30),
       st.integers(0, 4), st.booleans())
def test_intact_buffers_parse_whole(payloads: list[bytes], first_seq: int, slack: int,
                                    collect: bool) -> None:
    data = encode_records(payloads, first_seq) + bytes(8 * slack)
    result, out = _both(data, 0, len(data), first_seq, collect)
    assert isinstance(result, ParseResult)
    assert result.next_seq == first_seq + len(payloads)
    assert result.stop == (Stop.ZERO if slack >= 2 else Stop.END)
    if collect:
        assert out == [Record(first_seq + i, p) for i, p in enumerate(payloads)]


def test_every_stop_reason_is_reached_alike() -> None:
    data = bytearray(encode_records([b"one", b"two", b"three"], 7) + bytes(16))
    second = framing.framed_size(3)
    seen = set()
    cases: list[tuple[bytes, int, dict[str, Any]]] = [
        (bytes(data), len(data) - 16, {}),  # END
        (bytes(data), len(data), {}),  # ZERO
        (bytes(data), len(data) - 20, {}),  # SHORT
        (bytes(data), len(data), {"max_records": 2}),  # LIMIT by count
        (bytes(data), len(data), {"max_bytes": 4}),  # LIMIT by bytes
    ]
    flipped = bytearray(data)
    flipped[second + 17] ^= 4
    cases.append((bytes(flipped), len(data), {}))  # CRC
    bad = bytearray(data)
    struct.pack_into("<I", bad, second + 4, 9)
    cases.append((bytes(bad), len(data), {}))  # BAD_LENGTH
    reseq = bytearray(data)
    _reframe(reseq, second, seq=99)
    cases.append((bytes(reseq), len(data), {}))  # SEQ
    for buf, end, limits in cases:
        result, _out = _both(buf, 0, end, 7, True, **limits)
        assert isinstance(result, ParseResult)
        seen.add(result.stop)
    assert seen == {Stop.END, Stop.ZERO, Stop.SHORT, Stop.LIMIT, Stop.CRC, Stop.BAD_LENGTH,
                    Stop.SEQ}


def test_short_reports_the_length_the_frame_needs() -> None:
    data = encode_records([b"x" * 100], 1)
    result, _out = _both(data, 0, 50, 1, True)
    assert result == ParseResult(0, 1, Stop.SHORT, 116)


def test_max_bytes_takes_one_record_unless_told_not_to() -> None:
    data = encode_records([b"x" * 40, b"y"], 3)
    result, out = _both(data, 0, len(data), 3, True, max_bytes=10)
    assert result == ParseResult(framing.framed_size(40), 4, Stop.LIMIT, 0)
    assert out == [Record(3, b"x" * 40)]
    result, out = _both(data, 0, len(data), 3, True, max_bytes=10, at_least_one=False)
    assert result == ParseResult(0, 3, Stop.LIMIT, 0) and out == []


def test_seq_past_the_largest_is_a_python_int() -> None:
    data = encode_records([b"last"], LAST_SEQ) + bytes(16)
    result, out = _both(data, 0, len(data), LAST_SEQ, True)
    assert result == ParseResult(framing.framed_size(4), 1 << 64, Stop.ZERO, 0)
    assert out == [Record(LAST_SEQ, b"last")]
    for seq in (-1, 1 << 64, 1 << 90):
        result, _out = _both(data, 0, len(data), seq, True)
        assert result == ParseResult(0, seq, Stop.SEQ, 0)


def test_a_walk_without_out_still_checks_crcs() -> None:
    data = bytearray(encode_records([b"a", b"b", b"c"], 1))
    data[framing.framed_size(1) * 2 + 16] ^= 1
    result, out = _both(bytes(data), 0, len(data), 1, False)
    assert out is None
    assert result == ParseResult(framing.framed_size(1) * 2, 3, Stop.CRC, 0)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_other_buffers_give_bytes_payloads(kind: Callable[[bytes], Any]) -> None:
    data = encode_records([b"ab", b"", b"cde"], 4) + bytes(8)
    result, out = _both(kind(data), 0, len(data), 4, True)
    assert result == ParseResult(len(data) - 8, 7, Stop.END, 0)
    assert out == [Record(4, b"ab"), Record(5, b""), Record(6, b"cde")]


@pytest.mark.parametrize(("offset", "end"), [(-1, 10), (0, 10_000), (-8, -1)])
def test_offsets_outside_the_buffer_are_refused_alike(offset: int, end: int) -> None:
    data = encode_records([b"x"], 1)
    result, _out = _both(data, offset, end, 1, True)
    assert result == (ValueError, "need 0 <= offset and end <= len(buf)")


def test_offset_past_end_is_the_end() -> None:
    data = encode_records([b"x", b"y"], 1)
    result, _out = _both(data, len(data), 8, 1, True)
    assert result == ParseResult(len(data), 1, Stop.END, 0)


def test_out_may_be_any_appendable_and_its_errors_propagate() -> None:
    data = encode_records([b"p", b"q"], 1)
    out: collections.deque[Record] = collections.deque()
    result = _c_module().parse_records(data, 0, len(data), 1, out)
    assert result == ParseResult(len(data), 3, Stop.END, 0)
    assert list(out) == [Record(1, b"p"), Record(2, b"q")]

    class Full:
        def append(self, record: Record) -> None:
            raise OverflowError("full")

    for parse in (_c_module().parse_records, parse_records_python):
        with pytest.raises(OverflowError, match="full"):
            parse(data, 0, len(data), 1, Full())  # type: ignore[arg-type]


def test_bad_arguments_raise() -> None:
    parse = _c_module().parse_records
    data = encode_records([b"x"], 1)
    with pytest.raises(TypeError):
        parse(data, 0, len(data), 1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword"):
        parse(data, 0, len(data), 1, None, max_recs=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="max_bytes must be an int"):
        parse(data, 0, len(data), 1, None, max_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse("text", 0, 4, 1, None)  # type: ignore[arg-type]


def _append_reopen_read(path: Path) -> list[Record]:
    batches = [[f"r{b}-{i}".encode() * (1 + i % 30) for i in range(40)] for b in range(12)]
    with PersistentQueue.open(path, capacity_bytes=1 << 20, segment_bytes=8192) as queue:
        for batch in batches:
            queue.append(batch)
    with PersistentQueue.open(path, capacity_bytes=1 << 20, segment_bytes=8192) as queue:
        return (queue.read(1, max_records=10_000) + queue.read(200, max_records=7)
                + queue.read(333, max_bytes=100))


def test_queue_reads_the_same_with_either_parser(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Several 8 KiB segments: recovery scans, index walks and windowed reads all parse.
    with_c = _append_reopen_read(tmp_path / "c")
    monkeypatch.setattr(reader, "parse_records", parse_records_python)
    monkeypatch.setattr(segments, "parse_records", parse_records_python)
    assert _append_reopen_read(tmp_path / "python") == with_c
    assert len(with_c) == 12 * 40 + 7 + 1
