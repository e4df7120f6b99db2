"""The libpmem backend: the unit and crash suites again on pmem, and its refusals.

libpmem reads PMEM_IS_PMEM_FORCE when it loads, so these run in child processes: with
it set, an ordinary file counts as pmem and ``persist="auto"`` picks the pmem path
(``pmem_map_file`` + ``pmem_memcpy_persist``). Its durability is not what
these test (an ordinary file is not persistent memory); the code path is.
"""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
needs_libpmem = pytest.mark.skipif(ctypes.util.find_library("pmem") is None,
                                   reason="libpmem not installed (Debian libpmem1)")


def run_child(code: str, queue_dir: Path, *, force_pmem: bool) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (argv[1] = ``queue_dir``), with PMEM_IS_PMEM_FORCE=1
    or without it: libpmem reads it once, when it loads."""
    env = {k: v for k, v in os.environ.items() if k != "PMEM_IS_PMEM_FORCE"}
    if force_pmem:
        env["PMEM_IS_PMEM_FORCE"] = "1"
    return subprocess.run([sys.executable, "-c", code, str(queue_dir)],
                          capture_output=True, text=True, timeout=60, env=env)


@needs_libpmem
@pytest.mark.crash
def test_unit_and_crash_suites_pass_on_the_pmem_backend(tmp_path: Path) -> None:
    env = {**os.environ, "PMEM_IS_PMEM_FORCE": "1", "IOTPIPE_QUEUE_EXPECT_PERSIST": "pmem",
           "IOTPIPE_CRASH_KILLS": "40"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "pytest"), "-o", "addopts=",
         str(HERE / "test_queue_unit.py"), str(HERE / "test_queue_crash.py")],
        capture_output=True, text=True, env=env, timeout=240, cwd=HERE.parent.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


@needs_libpmem
@pytest.mark.unit
def test_forcing_pmem_on_an_ordinary_file_is_refused_with_the_reason(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom iotpipe.queue import PersistentQueue, QueueError\n"
        "try:\n    PersistentQueue.open(sys.argv[1], persist='pmem')\n"
        "except QueueError as exc:\n    print(exc); sys.exit(3)\n"
        "with PersistentQueue.open(sys.argv[1]) as q:\n    print(q.persist_mode)\n"
    )
    result = run_child(code, tmp_path / "q", force_pmem=False)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "pmem_is_pmem is false" in result.stdout


@needs_libpmem
@pytest.mark.unit
def test_auto_uses_pmem_only_where_libpmem_says_pmem(tmp_path: Path) -> None:
    code = ("import sys\nfrom iotpipe.queue import PersistentQueue\n"
            "with PersistentQueue.open(sys.argv[1]) as q:\n"
            "    q.append([b'x'] * 3)\n    print(q.persist_mode, len(q.read(1)))\n")
    plain = run_child(code, tmp_path / "a", force_pmem=False)
    forced = run_child(code, tmp_path / "b", force_pmem=True)
    assert plain.stdout.split() == ["fdatasync", "3"], plain.stderr
    assert forced.stdout.split() == ["pmem", "3"], forced.stderr


@pytest.mark.unit
def test_queue_works_without_libpmem(tmp_path: Path) -> None:
    code = (
        "import ctypes, sys\n"
        "def missing(*args, **kwargs):\n    raise OSError('libpmem.so.1: cannot open')\n"
        "ctypes.CDLL = missing\n"
        "from iotpipe.queue import PersistentQueue, QueueError\n"
        "with PersistentQueue.open(sys.argv[1]) as q:\n"
        "    q.append([b'x'])\n    print(q.persist_mode, len(q.read(1)))\n"
        "try:\n    PersistentQueue.open(sys.argv[1], persist='pmem')\n"
        "except QueueError as exc:\n    print('refused:', exc)\n"
    )
    result = run_child(code, tmp_path / "q", force_pmem=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "fdatasync 1"
    assert lines[1].startswith("refused:") and "libpmem" in lines[1]
