"""What the benchmarks measure of the processes they start: a process and its direct
children (an ingest pod, ``iotpipe up``), their memory and CPU time, and a bounded stop."""

from __future__ import annotations

import subprocess
import sys

import pytest
from support.waiting import wait_for

from iotpipe_tools.processes import cpu_seconds, family, rss_bytes, stop, tree_rss

pytestmark = pytest.mark.unit

# A parent that starts one child, then both wait on stdin (the child's ends with the parent).
_PARENT = ("import subprocess, sys\n"
           "child = subprocess.Popen([sys.executable, '-c', "
           "'import sys\\nwhile not sys.stdin.closed and sys.stdin.read(1): pass'], "
           "stdin=subprocess.PIPE)\n"
           "print(child.pid, flush=True)\n"
           "sys.stdin.read()\n"
           "child.stdin.close(); child.wait()\n")


def test_family_cpu_and_memory_cover_the_direct_children() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert sorted(family([parent.pid])) == sorted([parent.pid, child])
        assert tree_rss([parent.pid]) > rss_bytes(parent.pid) > 0
        spent = wait_for(lambda: cpu_seconds(parent.pid) or None, 30, "CPU time to show")
        assert spent > 0
    finally:
        stop(parent, timeout=10)
    assert parent.returncode is not None
    assert parent.pid not in family([parent.pid])
