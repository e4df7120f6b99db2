"""``support.processes.run_bounded``: a timed-out command takes what it started with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import run_bounded
from support.waiting import wait_for

pytestmark = pytest.mark.unit

# A parent that starts a long-lived child (as a benchmark starts its servers), reports the
# child's pid, and then hangs.
SPAWNER = ("import subprocess, sys, time\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
           "open(sys.argv[1], 'w').write(str(child.pid))\n"
           "time.sleep(600)\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of a killed parent is reaped by init; until then it is a zombie.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_timeout_kills_the_command_and_what_it_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    with pytest.raises(subprocess.TimeoutExpired):
        run_bounded([sys.executable, "-c", SPAWNER, str(pid_file)], timeout=8, text=True)
    child = int(pid_file.read_text())
    wait_for(lambda: not _alive(child), 10, what="the grandchild to be gone")


def test_a_finished_command_gives_its_output_and_status() -> None:
    done = run_bounded([sys.executable, "-c", "print('hi'); raise SystemExit(3)"],
                       timeout=30, text=True)
    assert (done.returncode, done.stdout) == (3, "hi\n")
    with pytest.raises(subprocess.CalledProcessError):
        run_bounded([sys.executable, "-c", "raise SystemExit(1)"], timeout=30, check=True)
