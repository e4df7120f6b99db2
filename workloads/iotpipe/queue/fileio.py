"""The file-operation seam of the queue.

Every byte the queue reads or writes, and every sync, goes through a ``FileIO`` object.
``OS_FILE_IO`` is the real thing; tests substitute an in-memory file system that keeps
written-but-unsynced bytes aside and drops them (all, or a torn part) at a simulated power
cut. Handles are opaque to the queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any, Protocol

__all__ = ["OS_FILE_IO", "FileIO", "InlineSyncWorker", "OsFileIO", "SyncWorker",
           "signal_eventfd", "sync_worker_for"]

try:
    from ._framing import SyncWorker as _CSyncWorker
    from ._framing import signal_eventfd as _signal_eventfd
    from ._framing import write_synced as _write_synced
except ImportError:  # not built: os.pwrite + os.fdatasync, os.eventfd_write; same effect
    _write_synced = None
    _signal_eventfd = None
    _CSyncWorker = None


def signal_eventfd(fd: int) -> None:
    """Add 1 to a non-blocking eventfd, e.g. from a durable listener on the writer thread.

    The C version keeps the GIL (the write never blocks); ``os.eventfd_write`` releases it,
    and taking it back made the queue's writer wait for the event loop's thread once more
    per commit group. A full counter is already signalled.
    """
    if _signal_eventfd is not None:
        _signal_eventfd(fd)
        return
    with contextlib.suppress(BlockingIOError):
        os.eventfd_write(fd, 1)


class FileIO(Protocol):
    """File operations the queue needs; ``handle`` values are whatever ``open`` returned."""

    def open(self, path: str, *, create: bool) -> Any: ...
    def close(self, handle: Any) -> None: ...
    def size(self, handle: Any) -> int: ...
    def pread(self, handle: Any, length: int, offset: int) -> bytes: ...
    def pwrite(self, handle: Any, data: bytes, offset: int) -> None: ...
    def fdatasync(self, handle: Any) -> None: ...
    def write_synced(self, handle: Any, data: bytes, offset: int) -> None: ...
    def fsync(self, handle: Any) -> None: ...
    def allocate(self, handle: Any, length: int) -> None: ...
    def rename(self, src: str, dst: str) -> None: ...
    def unlink(self, path: str) -> None: ...
    def sync_dir(self, path: str) -> None: ...
    def makedirs(self, path: str) -> None: ...
    def listdir(self, path: str) -> list[str]: ...
    def exists(self, path: str) -> bool: ...
    def free_bytes(self, path: str) -> int: ...
    def lock(self, path: str) -> Any: ...
    def unlock(self, handle: Any) -> None: ...


class SyncWorker(Protocol):
    """One ``write_synced`` at a time, finished in the background; its end is pollable.

    ``submit`` starts writing ``parts`` one after the other (held until ``collect``);
    ``fileno`` is readable once it finished; ``done`` says so without waiting; ``collect``
    waits if needed and raises the write's OSError. One outstanding write at a time:
    submitting another before collecting raises RuntimeError.
    """

    def submit(self, handle: Any, parts: list[bytes | memoryview], offset: int) -> None: ...
    def fileno(self) -> int: ...
    def done(self) -> bool: ...
    def collect(self) -> None: ...
    def close(self) -> None: ...


class InlineSyncWorker:
    """A ``SyncWorker`` that writes through ``io.write_synced`` within ``submit``.

    For file layers that are not the plain OS one (the power-cut simulation, benchmarks
    that skip the sync): every byte still goes through their ``write_synced``.
    """

    def __init__(self, io: FileIO) -> None:
        self._io = io
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._outstanding = False
        self._error: OSError | None = None

    def submit(self, handle: Any, parts: list[bytes | memoryview], offset: int) -> None:
        if self._efd < 0:
            raise ValueError("the SyncWorker is closed")
        if self._outstanding:
            raise RuntimeError("a write is outstanding: collect() it first")
        data = b"".join(parts)
        self._outstanding = True
        try:
            self._io.write_synced(handle, data, offset)
        except OSError as exc:
            self._error = exc
        signal_eventfd(self._efd)

    def fileno(self) -> int:
        if self._efd < 0:
            raise ValueError("the SyncWorker is closed")
        return self._efd

    def done(self) -> bool:
        return self._outstanding

    def collect(self) -> None:
        if not self._outstanding:
            raise RuntimeError("no write is outstanding")
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        self._outstanding = False
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
        self._outstanding = False


def sync_worker_for(io: FileIO) -> SyncWorker:
    """The C worker thread (no GIL) for real files, else an ``InlineSyncWorker``.

    Only a file layer whose ``write_synced`` is the OS one may bypass it: a subclass that
    overrides it (a simulation, a recording) gets every write through its own method.
    """
    if _CSyncWorker is not None and getattr(type(io), "write_synced", None) is \
            OsFileIO.write_synced:
        worker: SyncWorker = _CSyncWorker()
        return worker
    return InlineSyncWorker(io)


class OsFileIO:
    """Real files: ``os.pwrite`` + ``os.fdatasync`` on file descriptors."""

    def open(self, path: str, *, create: bool) -> int:
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        return os.open(path, flags, 0o644)

    def close(self, handle: int) -> None:
        os.close(handle)

    def size(self, handle: int) -> int:
        return os.fstat(handle).st_size

    def pread(self, handle: int, length: int, offset: int) -> bytes:
        data = os.pread(handle, length, offset)
        # Short reads only happen at the end of a file; loop in case of a signal.
        while len(data) < length:
            more = os.pread(handle, length - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def pwrite(self, handle: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(handle, view, offset)
            view = view[written:]
            offset += written

    def fdatasync(self, handle: int) -> None:
        os.fdatasync(handle)

    def write_synced(self, handle: int, data: bytes, offset: int) -> None:
        """``pwrite`` + ``fdatasync``: with the C module, in one release of the GIL.

        Each of os.pwrite and os.fdatasync releases the GIL and takes it back; in a busy
        server each take-back waits for the thread holding it (up to the interpreter's
        switch interval), twice per commit group.
        """
        if _write_synced is None:
            self.pwrite(handle, data, offset)
            self.fdatasync(handle)
        else:
            _write_synced(handle, data, offset)

    def fsync(self, handle: int) -> None:
        os.fsync(handle)

    def allocate(self, handle: int, length: int) -> None:
        # Real blocks up front: a full disk fails here, not in the middle of an append.
        os.posix_fallocate(handle, 0, length)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def sync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def free_bytes(self, path: str) -> int:
        """Bytes an unprivileged writer may still allocate on the file system of ``path``."""
        stats = os.statvfs(path)
        return stats.f_bavail * stats.f_frsize

    def lock(self, path: str) -> int:
        """Exclusive flock on ``path``; raises BlockingIOError if someone else holds it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        # The holder's pid, for the error message of the next opener (not for locking).
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def unlock(self, handle: int) -> None:
        os.close(handle)  # closing the descriptor releases the flock


OS_FILE_IO = OsFileIO()
