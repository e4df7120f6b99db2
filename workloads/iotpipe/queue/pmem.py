"""A small ctypes binding of libpmem (Debian ``libpmem1``), loaded only when asked for.

No maintained Python binding of PMDK exists, and the queue needs only a handful of calls:
map a segment file, ask whether it is real persistent memory, and copy+persist into it.
``PMEM_IS_PMEM_FORCE=1`` in the environment makes libpmem report any mapping as pmem (for
tests); libpmem reads it when the library initialises, so set it before the first load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

__all__ = ["PmemMapping", "PmemUnavailable", "libpmem"]


class PmemUnavailable(RuntimeError):
    """libpmem could not be loaded."""


class _LibPmem:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.pmem_map_file.restype = ctypes.c_void_p
        lib.pmem_map_file.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_uint,
            ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_int),
        ]
        lib.pmem_unmap.restype = ctypes.c_int
        lib.pmem_unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.pmem_is_pmem.restype = ctypes.c_int
        lib.pmem_is_pmem.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.pmem_memcpy_persist.restype = ctypes.c_void_p
        lib.pmem_memcpy_persist.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.pmem_errormsg.restype = ctypes.c_char_p
        lib.pmem_errormsg.argtypes = []
        lib.pmem_check_version.restype = ctypes.c_char_p
        lib.pmem_check_version.argtypes = [ctypes.c_uint, ctypes.c_uint]
        problem = lib.pmem_check_version(1, 0)
        if problem:
            raise PmemUnavailable(problem.decode(errors="replace"))

    def error(self) -> str:
        message = self.lib.pmem_errormsg()
        return message.decode(errors="replace") if message else "unknown libpmem error"


_lock = threading.Lock()
_loaded: _LibPmem | None = None
_load_error: str | None = None


def libpmem() -> _LibPmem:
    """The loaded library; raises PmemUnavailable (with the reason) when it cannot load."""
    global _loaded, _load_error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _load_error is not None:
            raise PmemUnavailable(_load_error)
        name = "libpmem.so.1"  # the soname of PMDK 1.x; find_library would spawn ldconfig
        try:
            try:
                library = ctypes.CDLL(name)
            except OSError:
                name = ctypes.util.find_library("pmem") or name
                library = ctypes.CDLL(name)
            _loaded = _LibPmem(library)
        except (OSError, AttributeError, PmemUnavailable) as exc:
            _load_error = f"libpmem not usable ({name}): {exc} (install Debian libpmem1)"
            raise PmemUnavailable(_load_error) from exc
        return _loaded


def available() -> bool:
    try:
        libpmem()
    except PmemUnavailable:
        return False
    return True


class PmemMapping:
    """An existing file mapped with ``pmem_map_file``; writes are copied and persisted."""

    def __init__(self, path: str) -> None:
        self._pmem = libpmem()
        mapped_length = ctypes.c_size_t(0)
        is_pmem = ctypes.c_int(0)
        address = self._pmem.lib.pmem_map_file(
            path.encode(), 0, 0, 0, ctypes.byref(mapped_length), ctypes.byref(is_pmem)
        )
        if not address:
            raise OSError(f"pmem_map_file({path}) failed: {self._pmem.error()}")
        self.address: int = address
        self.length = mapped_length.value
        self.is_pmem = bool(is_pmem.value)
        self.path = path
        self._close_lock = threading.Lock()

    def write_persist(self, data: bytes, offset: int) -> None:
        """Copy ``data`` to ``offset`` and persist it (``pmem_memcpy_persist``)."""
        if not self.address:
            raise ValueError(f"pmem mapping of {self.path} is closed")
        if offset < 0 or offset + len(data) > self.length:
            raise ValueError(f"pmem write [{offset}, {offset + len(data)}) outside {self.path}")
        self._pmem.lib.pmem_memcpy_persist(self.address + offset, data, len(data))

    def close(self) -> None:
        """Unmap (idempotent; the writer and reclaim may both close a sealed segment)."""
        with self._close_lock:
            if self.address:
                self._pmem.lib.pmem_unmap(self.address, self.length)
                self.address = 0
