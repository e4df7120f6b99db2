"""Sans-I/O framing of segment headers and records (bytes in, records or bytes out).

See the package docstring for the on-disk format. Nothing here touches a file.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import NamedTuple

from google_crc32c import value as crc32c

__all__ = [
    "FIRST_IN_WRITE",
    "RECORD_HEADER_BYTES",
    "SEGMENT_HEADER_BYTES",
    "ParseResult",
    "Record",
    "Stop",
    "clear_first_flag",
    "decode_segment_header",
    "encode_records",
    "encode_records_python",
    "encode_segment_header",
    "find_later_write",
    "framed_size",
    "parse_records",
    "parse_records_python",
]

SEGMENT_MAGIC = b"IOTQSEG1"
# magic, first_seq, segment_bytes, end of the previous segment's records (0: none), crc
SEGMENT_HEADER = struct.Struct("<8sQQII")
SEGMENT_HEADER_BYTES = SEGMENT_HEADER.size  # 32, keeps records 8-byte aligned

RECORD_HEADER = struct.Struct("<IIQ")  # crc32c, length|flags, seq
RECORD_HEADER_BYTES = RECORD_HEADER.size  # 16
# Set on the first record of every write (one write per segment per group commit). A write
# starts only after the previous one was synced, so an intact flagged record found past a
# damaged one proves the damage is inside synced data.
FIRST_IN_WRITE = 0x8000_0000
LENGTH_MASK = 0x7FFF_FFFF
MAX_FRAME = LENGTH_MASK

_pack_length_seq = struct.Struct("<IQ").pack
_pack_crc = struct.Struct("<I").pack
_unpack_header = RECORD_HEADER.unpack_from
_PADDING = tuple(b"\0" * n for n in range(8))
_NONZERO = re.compile(rb"[^\x00]")
_PAYLOAD_TYPE_ERROR = "payloads must be bytes (or bytes-like with 1-byte items), got {}"


class Record(NamedTuple):
    seq: int
    payload: bytes


class Stop:
    """Why ``parse_records`` stopped."""

    LIMIT = "limit"  # max_records / max_bytes reached
    END = "end"  # reached `end` (or too little room left for a header)
    ZERO = "zero"  # zero length: the end of written data
    SHORT = "short"  # the frame runs past `end` of the buffer given
    BAD_LENGTH = "bad length"  # length smaller than a header
    CRC = "checksum mismatch"
    SEQ = "unexpected sequence number"


class ParseResult(NamedTuple):
    offset: int  # where parsing stopped (start of the first record not returned)
    next_seq: int  # sequence number expected at `offset`
    stop: str  # a Stop value
    frame_length: int  # with Stop.SHORT: the full length the frame needs


def framed_size(payload_length: int) -> int:
    """Bytes one record takes on disk: header + payload, padded to 8."""
    return (RECORD_HEADER_BYTES + payload_length + 7) & ~7


def encode_segment_header(first_seq: int, segment_bytes: int, previous_end: int) -> bytes:
    head = SEGMENT_HEADER.pack(SEGMENT_MAGIC, first_seq, segment_bytes, previous_end, 0)[:-4]
    return head + _pack_crc(crc32c(head))


def decode_segment_header(data: bytes) -> tuple[int, int, int]:
    """``(first_seq, segment_bytes, previous_end)``; raises ValueError naming the problem."""
    if len(data) < SEGMENT_HEADER_BYTES:
        raise ValueError("segment header is truncated")
    magic, first_seq, segment_bytes, previous_end, crc = SEGMENT_HEADER.unpack_from(data)
    if magic != SEGMENT_MAGIC:
        raise ValueError(f"bad segment magic {magic!r}")
    if crc32c(bytes(data[: SEGMENT_HEADER_BYTES - 4])) != crc:
        raise ValueError("segment header checksum mismatch")
    return first_seq, segment_bytes, previous_end


def encode_records_python(payloads: Sequence[bytes], first_seq: int) -> bytes:
    """Frame ``payloads`` with consecutive seqs from ``first_seq`` as ONE write.

    The hot loop of every append, in Python: one struct pack, one concatenation, one CRC
    and one pack per record, then a single join. ``encode_records`` is the C twin of this
    (same bytes and errors, about ten times faster) when the extension is built.
    """
    if not isinstance(first_seq, int) or not 0 <= first_seq < 1 << 64:
        raise ValueError("first_seq must be an int in 0..2**64-1")
    if not isinstance(payloads, Sequence):
        raise TypeError(f"payloads must be a sequence of bytes, got {type(payloads).__name__}")
    if not payloads:
        return b""
    pack_length_seq, pack_crc, padding, crc = _pack_length_seq, _pack_crc, _PADDING, crc32c
    parts: list[bytes] = []
    extend = parts.extend
    expected = 0
    flag = FIRST_IN_WRITE
    payload: object = None
    try:
        for seq, payload in enumerate(payloads, first_seq):
            length = RECORD_HEADER_BYTES + len(payload)
            if length > LENGTH_MASK:
                raise ValueError(f"a record of {len(payload)} bytes is too large to frame")
            body = pack_length_seq(length | flag, seq) + payload
            extend((pack_crc(crc(body)), body, padding[-length & 7]))
            expected += (length + 7) & ~7
            flag = 0
    except (TypeError, BufferError):
        raise TypeError(_PAYLOAD_TYPE_ERROR.format(type(payload).__name__)) from None
    except struct.error:
        raise ValueError("seqs would pass 2**64-1") from None
    data = b"".join(parts)
    if len(data) != expected:  # len() was not the byte count (items wider than a byte)
        raise TypeError(_PAYLOAD_TYPE_ERROR.format(type(payload).__name__))
    return data


try:
    from ._framing import PayloadRun as PayloadRun
    from ._framing import encode_records as encode_records  # the C encoder (_framing.c)

    # Payloads held in one buffer (the middle's C builds them): a read-only sequence of
    # bytes, which encode_records frames without an object per payload.
    Sequence.register(PayloadRun)
    ENCODER = "c"
except ImportError:  # not built (no compiler at install): the same format, slower
    encode_records = encode_records_python
    ENCODER = "python"


def parse_records_python(
    buf: bytes,
    offset: int,
    end: int,
    seq: int,
    out: list[Record] | None,
    *,
    max_records: int = 1 << 62,
    max_bytes: int = 1 << 62,
    at_least_one: bool = True,
) -> ParseResult:
    """Parse records from ``buf[offset:end]`` expecting ``seq`` first.

    Appends to ``out`` unless it is None (a walk that still checks every CRC). At least one
    record is taken if one is intact, even past ``max_bytes``, unless ``at_least_one`` is
    False. Payloads are bytes whatever buffer ``buf`` is. ``parse_records`` is the C twin of
    this (the same results) when the extension is built.
    """
    if offset < 0 or end > len(buf):
        raise ValueError("need 0 <= offset and end <= len(buf)")
    if out is not None and type(buf) is not bytes:
        buf = bytes(buf)  # slices of it become the payloads
    count = 0
    payload_bytes = 0
    while count < max_records:
        if offset + RECORD_HEADER_BYTES > end:
            return ParseResult(offset, seq, Stop.END, 0)
        crc, length_flags, record_seq = _unpack_header(buf, offset)
        length = length_flags & LENGTH_MASK
        if length == 0:
            return ParseResult(offset, seq, Stop.ZERO, 0)
        if length < RECORD_HEADER_BYTES:
            return ParseResult(offset, seq, Stop.BAD_LENGTH, 0)
        if offset + length > end:
            return ParseResult(offset, seq, Stop.SHORT, length)
        body = buf[offset + 4 : offset + length]
        if crc32c(body) != crc:
            return ParseResult(offset, seq, Stop.CRC, 0)
        if record_seq != seq:
            return ParseResult(offset, seq, Stop.SEQ, 0)
        size = length - RECORD_HEADER_BYTES
        if payload_bytes + size > max_bytes and (count or not at_least_one):
            return ParseResult(offset, seq, Stop.LIMIT, 0)
        if out is not None:
            out.append(Record(seq, body[12:]))
        payload_bytes += size
        count += 1
        seq += 1
        offset += (length + 7) & ~7
    return ParseResult(offset, seq, Stop.LIMIT, 0)


try:
    from . import _framing as _c_framing

    _c_framing.set_parse_types(Record, ParseResult, (
        Stop.LIMIT, Stop.END, Stop.ZERO, Stop.SHORT, Stop.BAD_LENGTH, Stop.CRC, Stop.SEQ))
    parse_records = _c_framing.parse_records
    PARSER = "c"
except ImportError:  # not built: the same results, slower
    parse_records = parse_records_python
    PARSER = "python"


def clear_first_flag(chunk: bytes) -> bytes:
    """``chunk`` with its first record's FIRST_IN_WRITE flag cleared (CRC recomputed).

    Used when several appenders' chunks are merged into one write: only the first record
    after a sync point may carry the flag.
    """
    return first_header_unflagged(chunk) + chunk[RECORD_HEADER_BYTES:]


def first_header_unflagged(chunk: bytes) -> bytes:
    """The 16-byte header of ``chunk``'s first record without FIRST_IN_WRITE (CRC
    recomputed): followed by ``chunk[16:]`` it is ``clear_first_flag(chunk)``."""
    _crc, length_flags, seq = _unpack_header(chunk, 0)
    length = length_flags & LENGTH_MASK
    length_seq = _pack_length_seq(length, seq)
    return _pack_crc(crc32c(length_seq + chunk[RECORD_HEADER_BYTES:length])) + length_seq


def find_later_write(buf: bytes, offset: int, end: int, after_seq: int) -> int | None:
    """Offset of an intact record flagged FIRST_IN_WRITE with seq > ``after_seq``, or None.

    Used after recovery stopped at ``offset``: such a record was written after a sync that
    covered the stop point, so the damage there is in durable data, not a torn tail.
    ``buf`` must start at file offset 0 (records are 8-byte aligned in the file).
    """
    while True:
        match = _NONZERO.search(buf, offset, end)
        if match is None:
            return None
        offset = match.start() & ~7
        if offset + RECORD_HEADER_BYTES > end:
            return None
        crc, length_flags, record_seq = _unpack_header(buf, offset)
        length = length_flags & LENGTH_MASK
        if (
            length_flags & FIRST_IN_WRITE
            and record_seq > after_seq
            and RECORD_HEADER_BYTES <= length <= end - offset
            and crc32c(buf[offset + 4 : offset + length]) == crc
        ):
            return offset
        offset += 8
