"""``iotpipe simulate``: a device fleet simulator and load generator for ``iotpipe ingest``.

Each simulated device holds one WebSocket connection, sends frames of ``--batch`` messages
with consecutive integer ids at ``--rate`` messages/s (0 = as fast as acks come back, with
at most ``--inflight`` unacked frames), and checks every reply:

- every id it sent is acked exactly once (``duplicate_acks`` and ``unacked`` must be 0),
- ``busy`` and ``rate_limited`` ids are sent again after the server's retry hint,
- every other error is counted by reason (those ids are not retried: the server refused
  them for good).

With ``--reconnect`` a device whose connection closes (drain, restart) reconnects with
backoff and sends its unacked ids again; duplicates this creates downstream are removed by
storage, which keys on (device_id, msg_id). Tokens are minted here from ``--secret`` (or
``IOTPIPE_AUTH_SECRET``); ``--insecure`` uses ``?device=``. Connections to a loopback target
are spread over source addresses 127.0.0.2, 127.0.0.3, ... (about 28k ports each).

Message ids are never reused across runs, because storage keeps one reading per (device,
message id) and would drop a second run's readings as duplicates of the first's: each run
starts its ids at ``--first-id``, by default the run's start time in microseconds since the
epoch. A run sends far fewer than one message per microsecond per device, so the next run
starts above every id this one used (as long as the clock does not step back).

``--payload fleet`` makes the devices look like a fleet: device ``<prefix><i>`` is a
thermometer, an electricity meter or a pump (by ``i % 3``) sending plausible, drifting
values; :func:`iotpipe.fleet.fleet_registry_yaml` writes the matching registry (classes and
locations), as ``iotpipe up`` does. ``--payload synthetic`` (the default, for load tests)
sends padded messages of about ``--size`` bytes.

A refused handshake is reported with the server's reason (``HTTP 401 bad_signature: ...``).

The report (``--json``: one JSON object on stdout) gives acks/s and ack latency
percentiles. Exit status: 0 if every sent message was acked exactly once and no message was
refused, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from websockets.asyncio.client import ClientConnection, connect

from iotpipe.auth import DEVICE_AUDIENCE, issue_token, load_secret
from iotpipe.settings import TierSettings, parse_settings, tier_config
from iotpipe_tools.simulate.device import Device
from iotpipe_tools.simulate.payloads import message_data
from iotpipe_tools.simulate.report import SimulationReport
from iotpipe_tools.sources import connect_from, raise_nofile, source_addresses

__all__ = ["SimulateSettings", "Simulation", "SimulationReport", "main", "run_simulation"]

CONNECT_TIMEOUT_S = 30.0  # TCP connect, then the opening handshake, each


class SimulateSettings(TierSettings):
    """Simulate a fleet of devices against an ingest server and check every ack."""

    model_config = tier_config("iotpipe simulate", "IOTPIPE_SIMULATE_", {"json_output": "json"})

    url: str = Field("ws://127.0.0.1:8080/v1/ingest", description="ingest WebSocket URL")
    connections: int = Field(100, ge=1, description="simulated devices (one connection each)")
    rate: float = Field(0.0, ge=0, description="messages/s per device (0 = as fast as acked)")
    size: int = Field(64, ge=16, le=60000, description="approximate JSON bytes per message")
    batch: int = Field(1, ge=1, description="messages per frame (>1: JSON array frames)")
    inflight: int = Field(2, ge=1, description="unacked frames per device")
    messages: int = Field(0, ge=0, description="messages per device (0: run for --duration)")
    duration: float = Field(10.0, gt=0, description="seconds to send (with --messages: the "
                            "time limit for sending them)")
    ramp: float = Field(0.0, ge=0, description="seconds over which connections are opened")
    connect_concurrency: int = Field(256, ge=1, description="handshakes in progress at once")
    ack_timeout: float = Field(30.0, gt=0, description="seconds to wait for the last acks")
    device_prefix: str = Field("sim-", description="device ids are <prefix><index>")
    first_device: int = Field(0, ge=0, description="index of the first device")
    first_id: int | None = Field(None, ge=1, le=2**62,
                                 description="first message id of every device (default: "
                                             "the start time in microseconds, so a later "
                                             "run never reuses an id)")
    payload: Literal["synthetic", "fleet"] = Field(
        "synthetic", description="synthetic: padded messages of --size bytes; fleet: "
                                 "thermometers, meters and pumps with drifting values")
    secret: str = Field("", description="token secret (default: IOTPIPE_AUTH_SECRET or the "
                                         "file named by IOTPIPE_AUTH_SECRET_FILE)")
    insecure: bool = Field(False, description="no token; send ?device=<id> (insecure ingest)")
    reconnect: bool = Field(False, description="reconnect and resend unacked ids on close")
    spread_sources: bool = Field(True, description="use 127.0.0.2.. as source addresses")
    acked_file: Path | None = Field(None, description="write acked 'device_id<TAB>msg_id' lines")
    json_output: bool = Field(False, description="print one JSON report (also --json)")


class Simulation:
    def __init__(self, settings: SimulateSettings) -> None:
        self.settings = settings
        self.report = SimulationReport(connections=settings.connections)
        self.sources = source_addresses(settings.url, settings.connections,
                                        settings.spread_sources)
        self.secret = settings.secret.encode()
        if not settings.insecure and not self.secret:
            try:
                self.secret = load_secret()
            except RuntimeError as exc:
                raise ValueError(f"give --secret or --insecure; {exc}") from None
        self.stop_sending = asyncio.Event()
        self.handshakes = asyncio.Semaphore(settings.connect_concurrency)
        self._steady: tuple[float, int] | None = None
        self._devices_connected = 0
        self.give_up_at = math.inf
        self._template = message_data(settings.size, 0)
        self.first_id = settings.first_id if settings.first_id is not None \
            else time.time_ns() // 1000

    def data(self, msg_id: int) -> dict[str, Any]:
        return {**self._template, "v": msg_id * 0.5}

    def finished(self, device: Device) -> bool:
        return self.stop_sending.is_set() and device.all_settled()

    async def connect(self, device: Device) -> ClientConnection:
        settings = self.settings
        url = settings.url
        headers = {}
        if settings.insecure:
            url += ("&" if "?" in url else "?") + f"device={device.device_id}"
        else:
            token = issue_token(self.secret, device.device_id, DEVICE_AUDIENCE, 86400)
            headers["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {}
        if device.source is not None:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                kwargs["sock"] = await connect_from(device.source, url)
        return await connect(url, additional_headers=headers, compression=None,
                             open_timeout=CONNECT_TIMEOUT_S, max_size=1 << 20,
                             ping_interval=None, **kwargs)

    def first_connect(self) -> None:
        """A device connected for the first time; the last one ends the ramp-up."""
        self._devices_connected += 1
        if self._devices_connected == self.settings.connections:
            self._steady = (time.monotonic(), self.report.acked)

    async def run(self) -> SimulationReport:
        settings = self.settings
        raise_nofile(settings.connections + 1024)
        devices = [Device(self, settings.first_device + i) for i in range(settings.connections)]
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()

        async def open_all() -> None:
            for i, device in enumerate(devices):
                tasks.append(asyncio.create_task(device.run()))
                if settings.ramp:
                    await asyncio.sleep(settings.ramp / settings.connections)
                elif i % 100 == 99:
                    await asyncio.sleep(0)  # let handshakes progress while we open more

        opener = asyncio.create_task(open_all())
        # The clock runs from the start, ramp included: --duration is wall time.
        if settings.messages == 0:
            await asyncio.sleep(settings.duration)
            self.stop_sending.set()
            self.report.send_elapsed_s = time.monotonic() - start
            self.report.acked_at_stop = self.report.acked
            self.give_up_at = time.monotonic() + settings.ack_timeout
            opener.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=settings.ack_timeout + 5)
        else:
            # --duration bounds the time to send them all, --ack-timeout the wait after it.
            overall = settings.duration + settings.ack_timeout
            self.give_up_at = start + overall
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opener, overall)
            if tasks:
                await asyncio.wait(tasks, timeout=max(0.0, self.give_up_at - time.monotonic()) + 5)
            self.stop_sending.set()
            self.report.send_elapsed_s = time.monotonic() - start
            self.report.acked_at_stop = self.report.acked
        if self._steady is not None:
            at, acked_then = self._steady
            window = start + self.report.send_elapsed_s - at
            if window > 0.5:
                self.report.steady_acks_per_s = (self.report.acked_at_stop - acked_then) / window
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.report.elapsed_s = time.monotonic() - start
        self.report.unacked = sum(len(d.pending) + len(d.retry) for d in devices)
        self.report.never_connected = sum(1 for d in devices if not d.ever_connected)
        self.report.acked_ids = {d.device_id: d.acked for d in devices}
        return self.report


async def run_simulation(settings: SimulateSettings) -> SimulationReport:
    return await Simulation(settings).run()


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(SimulateSettings, argv)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        report = asyncio.run(run_simulation(settings))
    except ValueError as exc:
        print(f"iotpipe simulate: error: {exc}", file=sys.stderr)
        return 2
    for refusal, count in report.refusals.most_common():
        print(f"iotpipe simulate: ingest refused {count} connection(s): {refusal}",
              file=sys.stderr)
    if settings.acked_file is not None:
        report.write_acked(settings.acked_file)
    result = report.to_dict()
    if settings.json_output:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    return 0 if report.ok else 1
