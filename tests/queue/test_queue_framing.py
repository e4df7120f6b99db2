"""Sans-I/O tests of the record framing: bytes in, records and stop reasons out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotpipe.queue.framing import (
    FIRST_IN_WRITE,
    RECORD_HEADER,
    Record,
    Stop,
    clear_first_flag,
    decode_segment_header,
    encode_records,
    encode_segment_header,
    find_later_write,
    framed_size,
    parse_records,
)

pytestmark = pytest.mark.unit


@given(st.lists(st.binary(max_size=300), max_size=30), st.integers(1, 1 << 40))
def test_encode_then_parse_round_trips(payloads: list[bytes], first_seq: int) -> None:
    data = encode_records(payloads, first_seq)
    assert len(data) == sum(framed_size(len(p)) for p in payloads)
    assert len(data) % 8 == 0
    records: list[Record] = []
    result = parse_records(data, 0, len(data), first_seq, records)
    assert records == [Record(first_seq + i, p) for i, p in enumerate(payloads)]
    assert result.offset == len(data) and result.next_seq == first_seq + len(payloads)
    assert result.stop == Stop.END


def test_only_the_first_record_of_a_write_is_flagged() -> None:
    data = encode_records([b"a", b"bb", b"ccc"], 10)
    flags = []
    offset = 0
    while offset < len(data):
        _, length_flags, _ = RECORD_HEADER.unpack_from(data, offset)
        flags.append(bool(length_flags & FIRST_IN_WRITE))
        offset += framed_size((length_flags & 0x7FFF_FFFF) - 16)
    assert flags == [True, False, False]
    cleared = clear_first_flag(data)
    assert len(cleared) == len(data)
    assert not RECORD_HEADER.unpack_from(cleared, 0)[1] & FIRST_IN_WRITE
    records: list[Record] = []
    parse_records(cleared, 0, len(cleared), 10, records)
    assert [r.payload for r in records] == [b"a", b"bb", b"ccc"]


@pytest.mark.parametrize(("position", "expected"), [
    (1, Stop.CRC),  # the CRC itself
    (4, Stop.CRC),  # the length field is covered...
    (9, Stop.CRC),  # ...and the sequence number...
    (20, Stop.CRC),  # ...and the payload
])
def test_any_flipped_bit_in_a_record_is_caught(position: int, expected: str) -> None:
    data = bytearray(encode_records([b"payload-bytes"], 5))
    data[position] ^= 0x01
    result = parse_records(bytes(data), 0, len(data), 5, [])
    assert result.stop in (expected, Stop.SHORT, Stop.BAD_LENGTH)
    assert result.offset == 0


def test_stops_at_zero_length_wrong_seq_and_short_frames() -> None:
    data = encode_records([b"x" * 10], 1) + bytes(64)
    assert parse_records(data, 0, len(data), 1, []).stop == Stop.ZERO
    assert parse_records(data, 0, len(data), 2, []).stop == Stop.SEQ
    short = parse_records(data, 0, 20, 1, [])
    assert (short.stop, short.frame_length) == (Stop.SHORT, 26)


def test_byte_limit_returns_at_least_one_record() -> None:
    data = encode_records([b"a" * 100, b"b" * 100], 1)
    records: list[Record] = []
    result = parse_records(data, 0, len(data), 1, records, max_bytes=10)
    assert [r.seq for r in records] == [1] and result.stop == Stop.LIMIT
    assert parse_records(data, 0, len(data), 1, [], max_bytes=10,
                         at_least_one=False).offset == 0


def test_later_write_after_damage_is_found_but_a_torn_tail_is_not() -> None:
    first = encode_records([b"one", b"two"], 1)
    second = encode_records([b"three"], 3)
    segment = bytearray(32) + bytearray(first) + bytearray(second) + bytearray(64)
    damaged = bytearray(segment)
    damaged[32 + 18] ^= 0xFF  # inside record 1: synced before the write of record 3
    assert find_later_write(bytes(damaged), 32, len(damaged), 0) == 32 + len(first)
    # Damage in the last write (its own later records are not flagged): a torn tail.
    torn = bytearray(segment)
    torn[32 + len(first) + 18] ^= 0xFF
    assert find_later_write(bytes(torn), 32 + len(first), len(torn), 2) is None


def test_segment_header_round_trip_and_damage() -> None:
    header = encode_segment_header(42, 1 << 20, 4096)
    assert decode_segment_header(header) == (42, 1 << 20, 4096)
    with pytest.raises(ValueError, match="checksum"):
        decode_segment_header(header[:10] + b"\x01" + header[11:])
    with pytest.raises(ValueError, match="magic"):
        decode_segment_header(b"X" + header[1:])
