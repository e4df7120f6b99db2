"""Shared fixtures: free loopback ports, a per-test data directory, child-process cleanup."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports are handed out below the ephemeral range: a port taken from the ephemeral range can
# be grabbed by any outgoing connection (a simulator opening thousands) before the server
# that was meant to bind it starts. Ports handed out once are not handed out again.
_PORT_RANGE = (10000, max(10001, _ephemeral_low()))
_handed_out: set[int] = set()


def free_port_block(count: int = 1, host: str = "127.0.0.1") -> int:
    """A base port with ``count`` consecutive ports free on ``host`` right now."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - count)
        ports = range(base, base + count)
        if _handed_out.intersection(ports):
            continue
        sockets: list[socket.socket] = []
        try:
            for port in ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        _handed_out.update(ports)
        return base
    raise RuntimeError("no block of free ports found below the ephemeral range")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now, outside the ephemeral port range."""
    return free_port_block(1, host)


class ProcessGroup:
    """Starts child processes and guarantees they are killed at teardown, even on failure."""

    def __init__(self, log_dir: Path) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._log_dir = log_dir

    def start(self, args: list[str], name: str, env: dict[str, str] | None = None,
              **kwargs: object) -> subprocess.Popen[bytes]:
        log = open(self._log_dir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        full_env = {**os.environ, **(env or {})}
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


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    logs = tmp_path / "logs"
    logs.mkdir()
    group = ProcessGroup(logs)
    try:
        yield group
    finally:
        group.kill_all()
