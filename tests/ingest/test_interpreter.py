"""The interpreter settings ingest applies once started (GC freeze, GIL switch interval)."""

from __future__ import annotations

import gc
import sys
from collections.abc import Iterator

import pytest

from iotpipe.ingest.server import tune_interpreter
from iotpipe.ingest.settings import IngestSettings

pytestmark = pytest.mark.unit


@pytest.fixture
def restored() -> Iterator[None]:
    interval = sys.getswitchinterval()
    try:
        yield
    finally:
        gc.unfreeze()
        sys.setswitchinterval(interval)


def test_start_up_objects_leave_the_collected_generations(restored: None) -> None:
    started: list[object] = []
    started.append(started)  # a cycle: only the cyclic GC could ever free it
    assert any(obj is started for obj in gc.get_objects())
    tune_interpreter(IngestSettings(gil_switch_interval=0.0007))
    assert gc.get_freeze_count() > 0
    # Frozen: no collection walks it any more (get_objects lists the collected generations).
    assert not any(obj is started for obj in gc.get_objects())
    assert sys.getswitchinterval() == pytest.approx(0.0007)


def test_switch_interval_defaults_short_and_is_bounded() -> None:
    assert IngestSettings().gil_switch_interval < 0.005  # below Python's default
    for bad in (0.0, 0.5):
        with pytest.raises(ValueError, match="gil_switch_interval"):
            IngestSettings(gil_switch_interval=bad)
