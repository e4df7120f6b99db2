"""The queue's two system calls in C: ``write_synced`` (pwrite + fdatasync in one release of
the GIL) and ``signal_eventfd`` (an eventfd write that keeps the GIL)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from support.cmodules import c_module

from iotpipe.queue import fileio, signal_eventfd

pytestmark = pytest.mark.unit


def test_the_real_file_layer_uses_the_c_calls() -> None:
    c = c_module("iotpipe.queue._framing")
    assert fileio._write_synced is c.write_synced
    assert fileio._signal_eventfd is c.signal_eventfd


def test_write_synced_writes_every_byte_at_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        io = fileio.OsFileIO()
        io.write_synced(fd, b"abc", 0)
        io.write_synced(fd, bytearray(b"XY"), 1)
        io.write_synced(fd, memoryview(b"--tail")[2:], 10)
        big = os.urandom(3 << 20)  # more than one pwrite may take
        io.write_synced(fd, big, 64)
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert data[:3] == b"aXY" and data[64:64 + len(big)] == big


def test_write_synced_names_the_failure() -> None:
    c = c_module("iotpipe.queue._framing")
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(OSError) as caught:
        c.write_synced(write_end, b"x", 0)  # closed descriptor
    assert caught.value.errno == errno.EBADF
    with pytest.raises(ValueError, match="offset"):
        c.write_synced(0, b"x", -1)
    with pytest.raises(ValueError, match="file descriptor"):
        c.write_synced(-3, b"x", 0)
    with pytest.raises(TypeError):
        c.write_synced(0, "text", 0)


def test_signal_eventfd_adds_one_and_a_full_counter_is_not_an_error() -> None:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        signal_eventfd(fd)
        signal_eventfd(fd)
        assert os.eventfd_read(fd) == 2
        os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)  # the counter's maximum
        signal_eventfd(fd)  # EAGAIN: already signalled
        assert os.eventfd_read(fd) == 0xFFFF_FFFF_FFFF_FFFE
    finally:
        os.close(fd)
    with pytest.raises(OSError) as caught:
        signal_eventfd(fd)
    assert caught.value.errno == errno.EBADF
