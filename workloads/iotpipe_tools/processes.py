"""The processes a benchmark starts: their CPU time, and a bounded stop."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

__all__ = ["cpu_seconds", "stop"]


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its direct children (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[1] is the ppid; [11] utime, [12] stime (after the "(comm)" part).
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / ticks
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
