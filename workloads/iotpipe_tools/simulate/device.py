"""One simulated device of ``iotpipe simulate``: its connection, unacked ids and resend
queue, checking every reply the way firmware should (docs/protocols.md)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import orjson
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from iotpipe_tools.simulate.payloads import FleetSensor
from iotpipe_tools.simulate.report import RETRIED_REASONS, AckedIds

if TYPE_CHECKING:
    from iotpipe_tools.simulate import Simulation

__all__ = ["Device"]


class Device:
    """One simulated device: its connection, unacked ids and resend queue."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.device_id = f"{sim.settings.device_prefix}{index}"
        self.source = sim.sources[index % len(sim.sources)]
        self.first_id = sim.first_id
        self.next_id = sim.first_id
        self.sensor = FleetSensor(index) if sim.settings.payload == "fleet" else None
        self.pending: dict[int, float] = {}    # id -> when last sent
        self.acked = AckedIds(sim.first_id)
        self.refused: set[int] = set()
        self.retry: list[int] = []             # ids to send again (busy / rate_limited)
        self.retry_at = 0.0
        self.frame_no = 0
        self.frame_left: dict[int, int] = {}   # frame number -> ids without a final answer
        self.frame_of: dict[int, int] = {}     # id -> frame number it was last sent in
        self.window_open = asyncio.Event()
        self.window_open.set()
        self.ever_connected = False

    def all_settled(self) -> bool:
        return not self.pending and not self.retry

    async def run(self) -> None:
        settings = self.sim.settings
        backoff = 0.1
        while True:
            try:
                # At most --connect-concurrency handshakes at once: a storm of thousands
                # only makes them all time out.
                async with self.sim.handshakes:
                    ws = await self.sim.connect(self)
                async with ws:
                    self.sim.report.connected += 1
                    if not self.ever_connected:
                        self.ever_connected = True
                        self.sim.first_connect()
                    backoff = 0.1
                    # After a reconnect, everything not yet acked goes again.
                    if self.pending:
                        self.retry.extend(sorted(self.pending))
                        self.retry.sort()
                        self.sim.report.resent += len(self.pending)
                        self.pending.clear()
                    self.frame_left.clear()
                    self.frame_of.clear()
                    self.window_open.set()
                    sender = asyncio.create_task(self._send_loop(ws))
                    receiver = asyncio.create_task(self._receive(ws))
                    try:
                        await asyncio.wait({sender, receiver},
                                           return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for task in (sender, receiver):
                            task.cancel()
                        results = await asyncio.gather(sender, receiver,
                                                       return_exceptions=True)
                    for result in results:
                        if isinstance(result, ConnectionClosed):
                            raise result
                    return
            except InvalidStatus as exc:
                status = exc.response.status_code
                self.sim.report.connect_failures[f"http_{status}"] += 1
                reason = exc.response.body.decode(errors="replace").strip()[:200]
                self.sim.report.refusals[f"HTTP {status} {reason}".strip()] += 1
                if not settings.reconnect:
                    return
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                self.sim.report.closes[str(code)] += 1
                if not settings.reconnect or self.sim.finished(self):
                    return
            except (OSError, TimeoutError) as exc:
                self.sim.report.connect_failures[type(exc).__name__] += 1
                if not settings.reconnect:
                    return
            if time.monotonic() > self.sim.give_up_at:
                return
            self.sim.report.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _send_loop(self, ws: ClientConnection) -> None:
        """Send fresh and retried ids until done and every id is settled."""
        settings, sim = self.sim.settings, self.sim
        interval = settings.batch / settings.rate if settings.rate > 0 else 0.0
        next_at = time.monotonic()
        while True:
            now = time.monotonic()
            fresh_allowed = not sim.stop_sending.is_set() and (
                settings.messages == 0 or self.next_id - self.first_id < settings.messages)
            if not fresh_allowed and not self.retry:
                if not self.pending or now > sim.give_up_at:
                    return
                await asyncio.sleep(0.01)  # wait for acks (or retry hints) of what is out
                continue
            await self.window_open.wait()
            now = time.monotonic()
            if self.retry and now >= self.retry_at:
                ids = self.retry[: settings.batch]
                del self.retry[: len(ids)]
            elif fresh_allowed and now >= self.retry_at:
                # A retry hint holds back fresh messages too, as the device protocol asks:
                # sending on regardless is a flood (closed with 1008).
                if interval and now < next_at:
                    # Short naps, so a slow device notices the end of the run promptly.
                    await asyncio.sleep(min(next_at - now, 0.25))
                    continue
                next_at = max(next_at + interval, now - 1.0) if interval else now
                count = settings.batch if settings.messages == 0 else \
                    min(settings.batch, settings.messages - (self.next_id - self.first_id))
                ids = list(range(self.next_id, self.next_id + count))
                self.next_id += count
                sim.report.sent += count
            else:
                await asyncio.sleep(max(0.001, self.retry_at - now))
                continue
            sent_at = time.monotonic()
            self.frame_no += 1
            self.frame_left[self.frame_no] = len(ids)
            for msg_id in ids:
                self.pending[msg_id] = sent_at
                self.frame_of[msg_id] = self.frame_no
            sensor = self.sensor
            messages = [{"id": i, "data": sensor.reading() if sensor else sim.data(i)}
                        for i in ids]
            frame = orjson.dumps(messages if settings.batch > 1 else messages[0])
            if len(self.frame_left) >= settings.inflight:
                self.window_open.clear()
            await ws.send(frame, text=True)

    def _settle(self, msg_id: int) -> None:
        """One id got its final answer on this connection: free its frame's window slot."""
        frame = self.frame_of.pop(msg_id, None)
        if frame is None:
            return
        left = self.frame_left[frame] - 1
        if left:
            self.frame_left[frame] = left
        else:
            del self.frame_left[frame]
            if len(self.frame_left) < self.sim.settings.inflight:
                self.window_open.set()

    async def _receive(self, ws: ClientConnection) -> None:
        report = self.sim.report
        while True:
            reply = orjson.loads(await ws.recv(decode=False))
            kind = reply.get("type")
            ids = [i for i in reply.get("ids", []) if isinstance(i, int)]
            now = time.monotonic()
            if kind == "ack":
                for msg_id in ids:
                    sent_at = self.pending.pop(msg_id, None)
                    if sent_at is not None:
                        self.acked.add(msg_id)
                        report.acked += 1
                        report.add_latency(now - sent_at)
                        self._settle(msg_id)
                    elif msg_id in self.acked:
                        report.duplicate_acks += 1
                    else:
                        report.unknown_acks += 1
            elif kind == "busy" or reply.get("reason") in RETRIED_REASONS:
                if kind == "busy":
                    report.busy += len(ids)
                else:
                    report.errors[reply["reason"]] += len(ids)
                retry_ms = int(reply.get("retry_after_ms", 100))
                self.retry_at = max(self.retry_at, now + retry_ms / 1000)
                for msg_id in ids:
                    if self.pending.pop(msg_id, None) is not None:
                        self.retry.append(msg_id)
                        report.resent += 1
                        self._settle(msg_id)
                self.retry.sort()
            elif kind == "error":
                report.errors[str(reply.get("reason"))] += max(1, len(ids))
                for msg_id in ids:
                    if self.pending.pop(msg_id, None) is not None:
                        self.refused.add(msg_id)
                        self._settle(msg_id)
            else:
                report.errors["unknown_reply"] += 1
