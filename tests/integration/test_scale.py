"""Scale: 2,000 simultaneous device connections, all sending, every message acked and stored."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from support.devices import Fleet
from support.pipeline import Pipeline, assert_stored_exactly_once, metric_value
from support.processes import ProcessGroup
from support.waiting import eventually

from iotpipe_tools.sources import raise_nofile

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CONNECTIONS = 2000
PER_DEVICE = 6


async def test_two_thousand_devices_at_once(procs: ProcessGroup, tmp_path: Path) -> None:
    raise_nofile(65536)  # the children inherit it: ingest holds one socket per device
    pipeline = Pipeline(procs, tmp_path)
    pipeline.start_all()
    devices = [f"dev-{i:04d}" for i in range(CONNECTIONS)]
    hold = asyncio.Event()
    fleet = Fleet(pipeline.ingest_url, {d: pipeline.device_token(d) for d in devices},
                  batch=2, interval=0.2, per_device=PER_DEVICE, spread_sources=True,
                  hold=hold, ramp_s=8.0, reply_timeout=30.0)
    task = asyncio.create_task(fleet.run(asyncio.Event()))
    try:
        # Every device is connected at the same time before any of them sends.
        await eventually(lambda: fleet.connected == CONNECTIONS, 90, "every device connected",
                         details=lambda: f"only {fleet.connected} connected "
                                         f"({fleet.reconnects} reconnects)")
        # The server counts a connection when its handler starts, just after the handshake.
        def gauge() -> float | None:
            return metric_value(pipeline.metrics("ingest"), "iotpipe_ingest_connections")

        await eventually(lambda: gauge() == CONNECTIONS, 10, "the connections gauge",
                         details=lambda: str(gauge()))
        hold.set()
        await asyncio.wait_for(task, timeout=120)
    finally:
        task.cancel()
    assert fleet.errors == Counter(), fleet.errors
    assert fleet.max_connected == CONNECTIONS
    assert fleet.total_acked() == CONNECTIONS * PER_DEVICE
    assert_stored_exactly_once(pipeline, fleet)
