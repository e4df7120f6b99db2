"""Every tier, run as a process, stops with status 0 on a SIGTERM that arrives while it is
still starting, and a tier on a busy port exits 1 naming the port (no traceback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.ports import free_port_block
from support.processes import ProcessGroup
from support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SECRET = "s" * 32


def _tier_args(tier: str, base: int, tmp: Path) -> list[str]:
    """Arguments that let ``tier`` start on its own (its upstream may be missing)."""
    (tmp / "registry.yaml").write_text("devices: {}\n")
    return {
        "middle": ["middle", "--host", "127.0.0.1", "--router-port", str(base),
                   "--pub-port", str(base + 1), "--feed-port", str(base + 2),
                   "--metrics-port", str(base + 3), "--data-dir", str(tmp / "middle")],
        "storage": ["storage", "--host", "127.0.0.1", "--metrics-port", str(base + 3),
                    "--feed-endpoints", f"tcp://127.0.0.1:{base + 2}",
                    "--sinks", f"sqlite://{tmp / 'readings.db'}", "--data-dir", str(tmp / "s"),
                    "--registry-file", str(tmp / "registry.yaml")],
        "relay": ["relay", "--host", "127.0.0.1", "--port", str(base),
                  "--metrics-port", str(base + 3), "--insecure-no-auth",
                  "--middle-pub-endpoints", f"tcp://127.0.0.1:{base + 1}",
                  "--registry-file", str(tmp / "registry.yaml")],
        "ingest": ["ingest", "--host", "127.0.0.1", "--port", str(base),
                   "--metrics-port", str(base + 3), "--insecure-no-auth",
                   "--data-dir", str(tmp / "ingest"),
                   "--middle-endpoints", f"tcp://127.0.0.1:{base + 1}"],
        "up": ["up", "--host", "127.0.0.1", "--base-port", str(base),
               "--data-dir", str(tmp / "up")],
    }[tier]


def _catches_sigterm(pid: int) -> bool:
    """True once ``pid`` has a handler for SIGTERM (the SigCgt mask in /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _metrics_answer(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("delay_s", [0.0, 0.1])
@pytest.mark.parametrize("tier", ["middle", "storage", "relay", "ingest", "up"])
def test_sigterm_while_starting_stops_the_tier_with_status_0(
        tier: str, delay_s: float, procs: ProcessGroup, tmp_path: Path) -> None:
    """SIGTERM as soon as the handler exists, and 0.1 s after the start (the issue's case;
    on a loaded machine the interpreter may not have got that far: then it is sent as soon
    as the handler exists, never before)."""
    base = free_port_block(10)
    proc = procs.iotpipe(*_tier_args(tier, base, tmp_path), name=tier,
                         env={"IOTPIPE_AUTH_SECRET": SECRET})
    started = time.monotonic()
    time.sleep(delay_s)
    # The exact precondition: the handler is in place (iotpipe installs it before importing
    # the tier). Everything after this instant, including the 0.1 s mark, must be handled.
    wait_for(lambda: _catches_sigterm(proc.pid) or proc.poll() is not None, 20,
             "a SIGTERM handler to be installed", interval=0.002)
    assert proc.poll() is None, procs.log(tier)
    handler_after = time.monotonic() - started
    early = not _metrics_answer(base + 3)  # the tier is not serving yet
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=20)  # promptly: no grace period waited out
    assert status == 0, (handler_after, procs.log(tier))
    assert "Traceback" not in procs.log(tier), procs.log(tier)
    print(f"{tier}: handler after {handler_after * 1000:.0f} ms, signalled before serving: "
          f"{early}")


@pytest.mark.parametrize("tier", ["middle", "relay", "ingest", "storage"])
def test_a_tier_on_a_busy_port_exits_1_naming_the_port(
        tier: str, tmp_path: Path) -> None:
    base = free_port_block(10)
    taken = base if tier != "storage" else base + 3  # storage only binds its metrics port
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        result = subprocess.run(
            [sys.executable, "-m", "iotpipe.cli", *_tier_args(tier, base, tmp_path)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "IOTPIPE_AUTH_SECRET": SECRET})
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert str(taken) in result.stderr and "in use" in result.stderr, result.stderr
