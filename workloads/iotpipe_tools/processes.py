"""The processes a benchmark starts: their CPU time and memory, and a bounded stop."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterable
from typing import Any

__all__ = ["cpu_seconds", "family", "rss_bytes", "stop", "tree_rss"]


def _stat(pid: int | str) -> list[str]:
    """The fields of /proc/PID/stat after the "(comm)" part: [1] the ppid, [11] utime,
    [12] stime (in clock ticks)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def family(pids: Iterable[int]) -> list[int]:
    """``pids`` and their direct children, as alive now (an ingest pod: its parent and
    processes; ``iotpipe up``: the supervisor and its tiers)."""
    wanted = set(pids)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat(entry)[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if int(entry) in wanted or ppid in wanted:
            found.append(int(entry))
    return found


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its direct children (Linux /proc)."""
    total = 0
    for member in family([pid]):
        try:
            fields = _stat(member)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS from /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_rss(pids: list[int]) -> int:
    """RSS of ``pids`` and their direct children."""
    total = 0
    for member in family(pids):
        with contextlib.suppress(OSError):
            total += rss_bytes(member)
    return total


def stop(proc: subprocess.Popen[Any], sig_int: bool = False, timeout: float = 60.0) -> None:
    """SIGTERM (or SIGINT) ``proc`` and wait ``timeout`` s for it, then SIGKILL it."""
    if proc.poll() is None:
        if sig_int:
            proc.send_signal(signal.SIGINT)
        else:
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
