"""A process supervisor for ``iotpipe up``: start children, restart the ones that die with
exponential backoff, stop them all in reverse start order.

Each child runs in its own session with its output in ``LOG_DIR/<name>.log``; on Linux it
gets SIGTERM if the supervisor dies, so a killed ``iotpipe up`` leaves no tiers behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from iotpipe import lifecycle

__all__ = ["ChildSpec", "RestartPolicy", "Supervisor", "describe_exit", "log_tail", "say"]


@dataclass(frozen=True)
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = True  # False: a clean exit (status 0) is final (the simulator's run ended)


class RestartPolicy:
    """Exponential backoff for a tier that keeps dying; forgiven after a stable run."""

    def __init__(self, initial_s: float = 0.5, factor: float = 2.0, max_s: float = 10.0,
                 stable_s: float = 30.0) -> None:
        self.initial_s = initial_s
        self.factor = factor
        self.max_s = max_s
        self.stable_s = stable_s

    def delay(self, consecutive_failures: int) -> float:
        if consecutive_failures <= 0:
            return 0.0
        return min(self.max_s, self.initial_s * self.factor ** (consecutive_failures - 1))

    def failures_after_exit(self, previous_failures: int, uptime_s: float) -> int:
        """The failure count after a child died having run ``uptime_s`` seconds."""
        return 1 if uptime_s >= self.stable_s else previous_failures + 1


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    restarts: int = 0
    done: bool = False  # will not be started again


def _die_with_parent() -> None:
    """Runs in each child before exec: SIGTERM it if the supervisor itself dies (Linux).

    Without this a SIGKILLed ``iotpipe up`` would leave its tiers running in their own
    sessions, holding the ports and queue locks of the next start.
    """
    lifecycle.die_with_parent(signal.SIGTERM)


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a tier's log, to show why it died without opening the file."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 4096))
            tail = log.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    {line[:300]}" for line in tail)


def say(message: str) -> None:
    print(f"iotpipe up: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Starts the children, restarts the ones that die, stops them all in reverse order."""

    def __init__(self, specs: list[ChildSpec], log_dir: Path, policy: RestartPolicy,
                 stop_timeout: float) -> None:
        self.children = [_Child(spec) for spec in specs]
        self.log_dir = log_dir
        self.policy = policy
        self.stop_timeout = stop_timeout
        self.stopping = False

    def _start(self, child: _Child) -> None:
        log: IO[bytes] = open(self.log_dir / f"{child.spec.name}.log", "ab")  # noqa: SIM115
        try:
            child.proc = subprocess.Popen(
                child.spec.argv, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **child.spec.env}, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        finally:
            log.close()
        child.started_at = time.monotonic()
        child.restart_at = None

    def start_all(self) -> None:
        for child in self.children:
            self._start(child)
            say(f"started {child.spec.name} (pid {child.proc.pid if child.proc else '?'})")

    def poll(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if child.done or self.stopping:
                continue
            if child.proc is not None:
                status = child.proc.poll()
                if status is None:
                    continue
                child.proc = None
                if status == 0 and not child.spec.restart:
                    child.done = True
                    say(f"{child.spec.name} finished")
                    continue
                child.failures = self.policy.failures_after_exit(child.failures,
                                                                 now - child.started_at)
                delay = self.policy.delay(child.failures)
                child.restart_at = now + delay
                log_path = self.log_dir / f"{child.spec.name}.log"
                say(f"{child.spec.name} exited with status {status}; restarting in {delay:.1f}s "
                     f"(see {log_path}){log_tail(log_path)}")
            elif child.restart_at is not None and now >= child.restart_at:
                self._start(child)
                child.restarts += 1
                say(f"restarted {child.spec.name} (pid {child.proc.pid if child.proc else '?'})")

    def stop_all(self) -> int:
        """SIGTERM in reverse start order, each waited for (then SIGKILL). Returns worst status."""
        self.stopping = True
        worst = 0
        for child in reversed(self.children):
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                say(f"{child.spec.name} did not stop within {self.stop_timeout:g}s: killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                status = proc.wait(timeout=10)
            word = describe_exit(status)
            say(f"{word} {child.spec.name}" if word == "stopped"
                 else f"stopped {child.spec.name} ({word})")
            if status not in (0, -signal.SIGTERM):
                worst = 1
        return worst


def describe_exit(status: int) -> str:
    """A stop status in words: a child that stopped because it was asked to is not an error."""
    if status in (0, -signal.SIGTERM):
        return "stopped"
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"
