"""Stop requests that arrive while a tier is still starting.

A tier spends its first second importing, opening its queue and binding ports before it
installs the handler that stops it cleanly. Python's default for SIGTERM kills the process
(status -15), and as PID 1 in a container, where no default action applies, the signal is
simply lost and ``docker stop`` waits out its whole grace period. So ``iotpipe`` installs
:func:`catch_early` before it even imports a tier: a SIGTERM or SIGINT that arrives during
start-up is remembered, and each tier, right after installing its real handler, asks
:func:`requested` and stops at once (status 0) if one came.

:func:`die_with_parent` is the other end of a process's life: a child that must not outlive
the process that started it (a tier under ``iotpipe up``, an ingest pod's process, a test's
server) asks the kernel for a signal when that parent dies, even by SIGKILL.
"""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["STOP_SIGNALS", "catch_early", "die_with_parent", "on_stop", "requested"]

_PR_SET_PDEATHSIG = 1
try:  # looked up once, so the call is safe in a forked child before exec (preexec_fn)
    _prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None
except (OSError, AttributeError):
    _prctl = None

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []


def _remember(signum: int, _frame: FrameType | None) -> None:
    _received.append(signum)


def catch_early() -> None:
    """Remember SIGTERM/SIGINT until the tier installs its own handlers (idempotent)."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (a tier run inside a test's thread)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _remember)


def die_with_parent(signum: int) -> bool:
    """Linux: have the kernel send ``signum`` to this process when its parent dies.

    The parent is the thread that forked it; the setting survives exec. Usable as a
    ``preexec_fn``. False where the kernel offers no such thing (the process then outlives
    a killed parent, as any shell job does).
    """
    if _prctl is None:
        return False
    return bool(_prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0)


def requested() -> int | None:
    """The first stop signal received while starting, if any."""
    return _received[0] if _received else None


def on_stop(stop: Callable[[int], None]) -> int | None:
    """Call ``stop(signum)`` on SIGTERM/SIGINT from now on, and at once for a stop signal that
    came while starting; returns that early signal, if any (the tier then stops at once)."""
    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    early = requested()
    if early is not None:
        stop(early)
    return early
