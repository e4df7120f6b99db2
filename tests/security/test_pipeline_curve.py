"""The four tiers as real processes with CurveZMQ on every ZeroMQ socket: devices' readings
reach storage and a live client, and the middle refused no tier of its own pipeline."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from support.devices import Fleet, LiveClient
from support.pipeline import Pipeline, metric_value
from support.processes import ProcessGroup
from support.waiting import eventually

from iotpipe import curve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


async def test_all_tiers_over_curve(procs: ProcessGroup, tmp_path: Path) -> None:
    keys = curve.ensure_keys(tmp_path / "secrets")
    flag = ["--curve-keys-dir", str(keys)]
    pipeline = Pipeline(procs, tmp_path, ingest_args=flag, middle_args=flag, relay_args=flag,
                        storage_args=flag)
    # The relay is ready only once its SUB completed a handshake with the middle, which a
    # CURVE server grants only to an admitted key.
    pipeline.start_all()
    live = LiveClient(pipeline.relay_url, pipeline.client_token("all"), {"prefixes": ["dev-"]})
    stop_live = asyncio.Event()
    live_task = asyncio.create_task(live.run(stop_live))
    try:
        await asyncio.wait_for(live.subscribed.wait(), 10)
        devices = [f"dev-{i:03d}" for i in range(5)]
        fleet = Fleet(pipeline.ingest_url, {d: pipeline.device_token(d) for d in devices},
                      batch=5, interval=0.02, per_device=40)
        await asyncio.wait_for(fleet.run(asyncio.Event()), timeout=90)
        assert fleet.errors == Counter(), fleet.errors
        assert fleet.total_acked() == 200
        acked = fleet.acked_pairs()
        assert pipeline.wait_stored(len(acked), timeout=60) == len(acked)
        stored = {(str(r["device_id"]), str(r["msg_id"])) for r in pipeline.stored()}
        assert stored == acked

        def heard() -> set[tuple[str, str]]:
            return {(str(f["device"]), str(f["id"])) for f in live.readings()}

        await eventually(lambda: acked <= heard(), 20, "every acked message heard live",
                         details=lambda: f"{len(acked - heard())} not heard")
        text = pipeline.metrics("middle")
        for sock in ("router", "pub", "feed"):
            refused = metric_value(text, "iotpipe_middle_refused_handshakes_total"
                                   f'{{reason="key",socket="{sock}"}}')
            assert refused == 0, f"the middle refused its own pipeline's tier on {sock}"
    finally:
        stop_live.set()
        await asyncio.wait_for(live_task, 10)
