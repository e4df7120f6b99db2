"""``lifecycle.die_with_parent``: a child that asked for it does not outlive a SIGKILLed
parent (what keeps a killed ``iotpipe up``, ingest pod or test run from leaving servers,
ports and queue locks behind)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import pytest
from support.waiting import wait_for

pytestmark = pytest.mark.unit

# A parent that starts a sleeping child (with or without the death signal), prints its pid
# and waits to be killed.
_PARENT = ("import functools, signal, subprocess, sys, time\n"
           "from iotpipe import lifecycle\n"
           "ask = sys.argv[1] == 'ask'\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
           "    preexec_fn=functools.partial(lifecycle.die_with_parent, signal.SIGTERM)\n"
           "    if ask else None)\n"
           "print(child.pid, flush=True)\n"
           "time.sleep(60)\n")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("ask", [True, False], ids=["asked", "control"])
def test_a_child_that_asked_dies_with_its_sigkilled_parent(ask: bool) -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, "ask" if ask else "no"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    child_pid = 0
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=10)
        if ask:
            wait_for(lambda: not _alive(child_pid), 10, "the child to die with its parent")
        else:  # the control: without the request the orphan lives on
            assert _alive(child_pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
