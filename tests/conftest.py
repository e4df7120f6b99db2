"""Shared fixtures; the plumbing behind them lives in the ``support`` package."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import ProcessGroup


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    logs = tmp_path / "logs"
    logs.mkdir()
    group = ProcessGroup(logs)
    try:
        yield group
    finally:
        group.kill_all()
