"""The plainest durable write, for baselines: ``pwrite`` + ``fdatasync`` into a ring file.

Used by ``bench queue`` (against the queue's appends) and ``bench middle`` (a ROUTER that
acknowledges a batch once its bytes are on disk).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PLAIN_FILE_BYTES", "PlainFile"]

PLAIN_FILE_BYTES = 64 << 20  # the size of a default queue segment


class PlainFile:
    """A preallocated file written in a ring: each ``append`` is one pwrite + fdatasync.

    ``written=False``: a fallocated file, whose first pass writes into unwritten extents
    (each sync also journals their conversion). ``written=True`` zero-fills the file first,
    so every sync finds its extents written: the true ceiling, which the queue's zero-ahead
    writes approach.
    """

    def __init__(self, path: Path, *, written: bool = False,
                 size: int = PLAIN_FILE_BYTES) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.posix_fallocate(self.fd, 0, size)
        if written:
            zeros = bytes(1 << 20)
            for offset in range(0, size, len(zeros)):
                os.pwrite(self.fd, zeros[:size - offset], offset)
        os.fsync(self.fd)
        self.offset = 0

    def append(self, data: bytes) -> None:
        """Write ``data`` at the ring's next offset (from the start when it would not fit)
        and make it durable."""
        if len(data) > self.size:
            raise ValueError(f"{len(data)} bytes do not fit a ring of {self.size}")
        if self.offset + len(data) > self.size:
            self.offset = 0
        view = memoryview(data)
        written = 0
        while written < len(data):  # pwrite may write less than asked
            written += os.pwrite(self.fd, view[written:], self.offset + written)
        os.fdatasync(self.fd)
        self.offset += len(data)

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)
