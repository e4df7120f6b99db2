"""Chaos and drain: tiers SIGKILLed (or SIGTERMed) while a fleet sends; nothing acked is lost."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from support.devices import Fleet, LiveClient, check_live_stream
from support.pipeline import (
    FORWARD_ACK_TIMEOUT_S,
    Pipeline,
    assert_stored_exactly_once,
    metric_value,
)
from support.processes import ProcessGroup
from support.waiting import eventually

from iotpipe.ingest.forwarder import CONSUMER
from iotpipe.queue import PersistentQueue

pytestmark = [pytest.mark.integration]

# Rounds of "kill every tier once"; raise locally for a longer soak.
ROUNDS = int(os.environ.get("IOTPIPE_CHAOS_ROUNDS", "1"))


@pytest.mark.crash
@pytest.mark.timeout(120 + 60 * ROUNDS)
@pytest.mark.parametrize("middles", [1, 2], ids=["one-middle", "two-middles"])
async def test_kill_every_tier_while_a_fleet_sends(procs: ProcessGroup, tmp_path: Path,
                                                   middles: int) -> None:
    """With two middles, killing the one ingest uses makes it fail over to the other."""
    seed = int(os.environ.get("IOTPIPE_CHAOS_SEED", str(time.time_ns() % 1_000_000)))
    print(f"chaos seed {seed} (IOTPIPE_CHAOS_SEED to replay)")
    rng = random.Random(seed)
    pipeline = Pipeline(procs, tmp_path, middles=middles)
    pipeline.start_all()
    victims = ["ingest", *pipeline.middle_names, "storage", "relay"]
    devices = [f"dev-{i:03d}" for i in range(30)]
    fleet = Fleet(pipeline.ingest_url, {d: pipeline.device_token(d) for d in devices},
                  batch=4, interval=0.05, reply_timeout=5.0)
    live = LiveClient(pipeline.relay_url, pipeline.client_token("watcher"),
                      {"prefixes": ["dev-"]})
    stop_fleet, stop_live = asyncio.Event(), asyncio.Event()
    fleet_task = asyncio.create_task(fleet.run(stop_fleet))
    live_task = asyncio.create_task(live.run(stop_live))
    kills: list[tuple[str, int]] = []
    try:
        await asyncio.sleep(2.0)
        for _ in range(ROUNDS):
            for tier in victims:
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                before = fleet.total_acked()
                await asyncio.to_thread(pipeline.kill, tier)
                kills.append((tier, before))
                down = rng.uniform(0.1, 1.5)
                if middles > 1 and tier in pipeline.middle_names:
                    # Down for longer than ingest's forward ack timeout, so ingest must fail
                    # over to the other middle (it rides out a shorter outage instead).
                    down += FORWARD_ACK_TIMEOUT_S + 1.5
                await asyncio.sleep(down)
                await asyncio.to_thread(pipeline.start, tier)
        # The system recovers: acks keep coming after the last restart.
        after_last = fleet.total_acked()
        await eventually(lambda: fleet.total_acked() >= after_last + 200, 30,
                         "progress after the last restart")
        stop_fleet.set()
        await asyncio.wait_for(fleet_task, timeout=60)
    finally:
        stop_fleet.set()
        fleet_task.cancel()
    print(f"kills (tier, acked before): {kills}; acked {fleet.total_acked()}, "
          f"reconnects {fleet.reconnects}, busy {fleet.busy}")
    assert fleet.errors == Counter(), fleet.errors
    assert_stored_exactly_once(pipeline, fleet)
    # The live client reconnects (with backoff) after the last relay restart: wait for
    # that connection, which the checks below count, rather than for a guessed second.
    await eventually(lambda: len(live.connections) >= ROUNDS + 1, 30,
                     "the live client to reconnect after every relay restart")
    stop_live.set()
    await asyncio.wait_for(live_task, timeout=10)
    # Live: the client reconnected after the relay died; within each connection readings of
    # a source are in order and every skipped seq was announced by a gap frame.
    assert len(live.connections) >= ROUNDS + 1  # the first, then one per relay restart
    totals = check_live_stream(live.connections)
    print(f"live totals: {totals}")
    assert totals["readings"] > 0
    seen = Counter((f["source"], f["seq"]) for f in live.readings())
    assert max(seen.values()) == 1, "a live event was delivered twice"
    if middles > 1:
        sources = {f["source"] for f in live.readings()}
        assert sources == {"mid-0", "mid-1"}, f"ingest never failed over: {sources}"
    # A device resending after an ingest crash may be logged twice upstream: storage stores it
    # once; live clients see it at most once per logged copy (distinct source seqs).


@pytest.mark.timeout(120)
async def test_sigterm_drains_ingest_under_load(procs: ProcessGroup, tmp_path: Path) -> None:
    pipeline = Pipeline(procs, tmp_path, ingest_args=["--drain-timeout", "40"])
    for tier in ("middle", "storage", "ingest"):
        pipeline.start(tier)
    devices = [f"dev-{i:03d}" for i in range(20)]
    fleet = Fleet(pipeline.ingest_url, {d: pipeline.device_token(d) for d in devices},
                  batch=10, interval=0.01, reply_timeout=5.0)
    stop_fleet = asyncio.Event()
    fleet_task = asyncio.create_task(fleet.run(stop_fleet))
    middle = pipeline.running["middle"]
    try:
        await asyncio.sleep(2.0)
        # Hold the middle tier still so a backlog builds up in the ingest queue...
        os.killpg(middle.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 20
        depth = 0.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.3)
            text = await asyncio.to_thread(pipeline.metrics, "ingest")
            depth = metric_value(text, "iotpipe_queue_depth_records") or 0.0
            if depth >= 500:
                break
        assert depth >= 500, f"no backlog built up (depth {depth})"
        ingest = pipeline.running["ingest"]
        # ...then ask ingest to stop, and let the middle tier go on.
        ingest.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        os.killpg(middle.pid, signal.SIGCONT)
        status = await asyncio.to_thread(ingest.wait, 60)
        assert status == 0, pipeline.procs.log("ingest")[-3000:]
    finally:
        os.killpg(middle.pid, signal.SIGCONT)
        stop_fleet.set()
    # Devices lose their connection (1001) and cannot reconnect: stop them.
    await asyncio.sleep(0.5)
    fleet_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fleet_task
    assert fleet.errors == Counter(), fleet.errors
    print(f"backlog at SIGTERM {depth:.0f}; acked {fleet.total_acked()}")
    # The queue left behind is empty: everything went to the middle tier before exit.
    with PersistentQueue.open(tmp_path / "ingest" / "p0", capacity_bytes=64 << 20,
                              consumers=(CONSUMER,)) as queue:
        assert queue.depth().records == 0
        assert queue.acked(CONSUMER) == queue.next_seq - 1 > 0
    assert_stored_exactly_once(pipeline, fleet)
