"""The consumer-cursor ledger: two checksummed slots written alternately, each + fdatasync.

A torn slot write leaves the other slot (the previous state) intact, and a cursor update
only returns after its slot is synced, so the newest valid slot is always the state that
was last acknowledged.
"""

from __future__ import annotations

import os
import struct

from google_crc32c import value as crc32c

from .errors import QueueCorrupted
from .fileio import FileIO

__all__ = ["LEDGER_NAME", "MAX_CONSUMER_NAME_BYTES", "Ledger"]

LEDGER_NAME = "cursors.ledger"
SLOT_BYTES = 64 << 10
MAX_CONSUMER_NAME_BYTES = 200
_SLOT_MAGIC = b"IOTQLDG1"
_SLOT_HEADER = struct.Struct("<8sIQI")  # magic, crc (of the rest), generation, body length
_ENTRY = struct.Struct("<QH")  # acked seq, name length


def encode_slot(generation: int, cursors: dict[str, int]) -> bytes:
    body = bytearray(struct.pack("<I", len(cursors)))
    for name, acked in sorted(cursors.items()):
        raw = name.encode()
        body += _ENTRY.pack(acked, len(raw)) + raw
    if _SLOT_HEADER.size + len(body) > SLOT_BYTES:
        raise ValueError(f"too many consumers for the ledger ({len(cursors)})")
    rest = struct.pack("<QI", generation, len(body)) + bytes(body)
    return _SLOT_MAGIC + struct.pack("<I", crc32c(rest)) + rest


def decode_slot(data: bytes) -> tuple[int, dict[str, int]] | None:
    """``(generation, cursors)`` of an intact slot, None for an empty or torn one."""
    magic, crc, generation, body_length = _SLOT_HEADER.unpack_from(data)
    if magic != _SLOT_MAGIC or _SLOT_HEADER.size + body_length > len(data):
        return None
    rest = data[12 : _SLOT_HEADER.size + body_length]
    if crc32c(rest) != crc:
        return None
    body = rest[12:]
    (count,) = struct.unpack_from("<I", body)
    offset = 4
    cursors: dict[str, int] = {}
    for _ in range(count):
        acked, name_length = _ENTRY.unpack_from(body, offset)
        offset += _ENTRY.size
        cursors[body[offset : offset + name_length].decode()] = acked
        offset += name_length
    return generation, cursors


class Ledger:
    """Durable ``{consumer: acked_seq}``; ``write`` returns once the new state is synced."""

    def __init__(self, file_io: FileIO, directory: str) -> None:
        self._io = file_io
        self.path = os.path.join(directory, LEDGER_NAME)
        if not file_io.exists(self.path):
            tmp = self.path + ".tmp"
            if file_io.exists(tmp):
                file_io.unlink(tmp)
            handle = file_io.open(tmp, create=True)
            try:
                file_io.allocate(handle, 2 * SLOT_BYTES)
                file_io.fsync(handle)
            finally:
                file_io.close(handle)
            file_io.rename(tmp, self.path)
            file_io.sync_dir(directory)
        self._handle = file_io.open(self.path, create=False)
        self.generation = 0
        self.cursors: dict[str, int] = {}
        size = file_io.size(self._handle)
        if size != 2 * SLOT_BYTES:
            file_io.close(self._handle)
            raise QueueCorrupted(self.path, 0, f"ledger size {size}, expected {2 * SLOT_BYTES}")
        damaged = 0
        for slot in range(2):
            data = file_io.pread(self._handle, SLOT_BYTES, slot * SLOT_BYTES)
            decoded = decode_slot(data)
            if decoded is None:
                damaged += data.count(0) != len(data)
            elif decoded[0] > self.generation:
                self.generation, self.cursors = decoded
        # One torn slot is an interrupted write (the other holds the state before it); two
        # written but invalid slots cannot come from a crash: the cursors are lost.
        if damaged == 2:
            file_io.close(self._handle)
            raise QueueCorrupted(self.path, 0, "both ledger slots fail their checksum")

    def write(self, cursors: dict[str, int]) -> None:
        generation = self.generation + 1
        data = encode_slot(generation, cursors)
        self._io.pwrite(self._handle, data, (generation % 2) * SLOT_BYTES)
        self._io.fdatasync(self._handle)
        self.generation = generation
        self.cursors = dict(cursors)

    def close(self) -> None:
        self._io.close(self._handle)
