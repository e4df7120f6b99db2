"""An in-memory file system for the queue's FileIO seam that can lose power.

Every file keeps two images: what readers see (``visible``) and what would survive a power
cut (``durable``). ``pwrite`` changes only the visible image and remembers the write as
pending; ``fdatasync``/``fsync`` make the visible image durable. ``power_cut`` returns a
fresh file system holding the durable images plus, depending on the mode, none of the
pending writes, a torn prefix of them, or a random subset of their 512-byte sectors (the
disk may persist a write's sectors in any order).

Simplifications, on purpose: namespace operations (create, rename, unlink) and size
changes (allocate) are durable at once; the queue syncs after each of them
anyway (files are created as temp files, synced, renamed, and the directory synced).
"""

from __future__ import annotations

import posixpath
import random
from dataclasses import dataclass, field

SECTOR = 512


class PowerCut(Exception):
    """Raised by the file system at the planned moment of a power cut."""


@dataclass
class SimFile:
    visible: bytearray = field(default_factory=bytearray)
    durable: bytearray = field(default_factory=bytearray)
    pending: list[tuple[int, bytes]] = field(default_factory=list)


def _write_into(image: bytearray, data: bytes, offset: int) -> None:
    if len(image) < offset:
        image.extend(bytes(offset - len(image)))
    image[offset:offset + len(data)] = data


class SimFS:
    """Implements iotpipe.queue.fileio.FileIO in memory (paths are plain strings)."""

    def __init__(self, files: dict[str, SimFile] | None = None,
                 dirs: set[str] | None = None) -> None:
        self.files: dict[str, SimFile] = files or {}
        self.dirs: set[str] = dirs or set()
        self._handles: dict[int, str] = {}
        self._next_handle = 1
        self._locks: set[str] = set()
        self.ops_until_cut: int | None = None  # a PowerCut is raised at this mutating op
        self.syncs = 0
        self.free = 1 << 40  # what free_bytes reports

    # -- power -------------------------------------------------------------------------

    def _tick(self) -> None:
        if self.ops_until_cut is None:
            return
        if self.ops_until_cut <= 0:
            raise PowerCut("power cut")
        self.ops_until_cut -= 1

    def power_cut(self, rng: random.Random, mode: str) -> SimFS:
        """The file system as found after the power comes back."""
        if mode not in ("drop", "prefix", "sectors"):
            raise ValueError(f"unknown power-cut mode {mode!r}")
        survivors: dict[str, SimFile] = {}
        for path, simfile in self.files.items():
            image = bytearray(simfile.durable)
            if mode == "prefix" and simfile.pending:
                total = sum(len(data) for _, data in simfile.pending)
                keep = rng.randint(0, total)
                for offset, data in simfile.pending:
                    if keep <= 0:
                        break
                    _write_into(image, data[:keep], offset)
                    keep -= len(data)
            elif mode == "sectors":
                for offset, data in simfile.pending:
                    start = offset
                    while start < offset + len(data):
                        stop = min((start // SECTOR + 1) * SECTOR, offset + len(data))
                        if rng.random() < 0.5:
                            _write_into(image, data[start - offset:stop - offset], start)
                        start = stop
            survivors[path] = SimFile(visible=bytearray(image), durable=image)
        return SimFS(survivors, set(self.dirs))

    # -- FileIO --------------------------------------------------------------------------

    def _file(self, handle: int) -> SimFile:
        return self.files[self._handles[handle]]

    def open(self, path: str, *, create: bool) -> int:
        if create:
            if path in self.files:
                raise FileExistsError(path)
            if posixpath.dirname(path) not in self.dirs:
                raise FileNotFoundError(posixpath.dirname(path))
            self._tick()
            self.files[path] = SimFile()
        elif path not in self.files:
            raise FileNotFoundError(path)
        handle = self._next_handle
        self._next_handle += 1
        self._handles[handle] = path
        return handle

    def close(self, handle: int) -> None:
        del self._handles[handle]

    def size(self, handle: int) -> int:
        return len(self._file(handle).visible)

    def pread(self, handle: int, length: int, offset: int) -> bytes:
        return bytes(self._file(handle).visible[offset:offset + length])

    def pwrite(self, handle: int, data: bytes, offset: int) -> None:
        self._tick()
        simfile = self._file(handle)
        data = bytes(data)
        # Trailing bytes equal to what is on the medium and in the cache change nothing,
        # whatever a power cut keeps (the queue writes zeros ahead of its records into
        # space that is zeros already): leave them out of what a cut can tear.
        end = len(data)
        while (end > 0 and offset + end <= len(simfile.durable)
               and data[end - 1] == simfile.durable[offset + end - 1]
               and data[end - 1] == simfile.visible[offset + end - 1]):
            end -= 1
        _write_into(simfile.visible, data, offset)
        if end:
            simfile.pending.append((offset, data[:end]))

    def fdatasync(self, handle: int) -> None:
        self._tick()
        simfile = self._file(handle)
        simfile.durable = bytearray(simfile.visible)
        simfile.pending.clear()
        self.syncs += 1

    fsync = fdatasync

    def write_synced(self, handle: int, data: bytes, offset: int) -> None:
        self.pwrite(handle, data, offset)
        self.fdatasync(handle)

    def allocate(self, handle: int, length: int) -> None:
        self._tick()
        simfile = self._file(handle)
        for image in (simfile.visible, simfile.durable):
            if len(image) < length:
                image.extend(bytes(length - len(image)))

    def rename(self, src: str, dst: str) -> None:
        self._tick()
        self.files[dst] = self.files.pop(src)
        for handle, path in self._handles.items():
            if path == src:
                self._handles[handle] = dst

    def unlink(self, path: str) -> None:
        self._tick()
        del self.files[path]

    def sync_dir(self, path: str) -> None:
        self._tick()

    def makedirs(self, path: str) -> None:
        self.dirs.add(path)

    def listdir(self, path: str) -> list[str]:
        return [posixpath.basename(p) for p in self.files if posixpath.dirname(p) == path]

    def exists(self, path: str) -> bool:
        return path in self.files or path in self.dirs

    def free_bytes(self, path: str) -> int:
        return self.free

    def lock(self, path: str) -> str:
        if path in self._locks:
            raise BlockingIOError(f"{path} is locked")
        self._locks.add(path)
        return path

    def unlock(self, handle: str) -> None:
        self._locks.discard(handle)
