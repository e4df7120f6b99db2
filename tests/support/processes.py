"""Child processes that are killed, with their whole process group, at teardown.

A SIGKILLed pytest runs no teardown; children started from its main thread also get
SIGKILL from the kernel then (``lifecycle.die_with_parent``). Not those started from other
threads: the signal follows the thread that forked, and a helper thread's end would kill a
child the test still uses.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iotpipe import lifecycle


def die_with_pytest() -> Callable[[], object] | None:
    """A ``preexec_fn`` that SIGKILLs the child when pytest dies, where that is safe."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return functools.partial(lifecycle.die_with_parent, signal.SIGKILL)


class ProcessGroup:
    """Starts child processes and guarantees they are killed at teardown, even on failure."""

    def __init__(self, log_dir: Path) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._log_dir = log_dir

    def start(self, args: list[str], name: str, env: dict[str, str] | None = None,
              **kwargs: object) -> subprocess.Popen[bytes]:
        log = open(self._log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        full_env = {**os.environ, **(env or {})}
        kwargs.setdefault("preexec_fn", die_with_pytest())
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=full_env,
            start_new_session=True, **kwargs,  # type: ignore[arg-type]
        )
        log.close()
        self._procs.append(proc)
        return proc

    def iotpipe(self, *args: str, name: str, env: dict[str, str] | None = None
                ) -> subprocess.Popen[bytes]:
        return self.start([sys.executable, "-m", "iotpipe.cli", *args], name=name, env=env)

    def log(self, name: str) -> str:
        path = self._log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill_all(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


def run_bounded(args: list[str], *, timeout: float, check: bool = False,
                capture_output: bool = True, **popen: Any) -> subprocess.CompletedProcess[Any]:
    """``subprocess.run`` for commands that start processes of their own (benchmarks start
    servers): the command gets its own session, and on timeout its whole process group is
    killed before ``TimeoutExpired`` is raised, so no server outlives the test."""
    if capture_output:
        popen.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    popen.setdefault("preexec_fn", die_with_pytest())
    proc = subprocess.Popen(args, start_new_session=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(args, timeout, out, err) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the command left behind
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
