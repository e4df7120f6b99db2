"""Devices and live clients for end-to-end tests.

The fleet is written here (not ``iotpipe simulate``) where a test needs full control over
resends: a device that loses its connection resends every unacknowledged message with the
SAME id, as real firmware does, so storage's (device_id, msg_id) identity is exercised.
Source addresses (and the descriptor limit the scale tests raise) come from the simulator's
library code, ``iotpipe_tools.simulate``.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from iotpipe_tools.sources import connect_from, source_addresses


@dataclass
class Fleet:
    """Devices that send numbered messages, wait for acks, and resend unacked ids on reconnect."""

    url: str
    tokens: dict[str, str]
    batch: int = 5
    interval: float = 0.05
    per_device: int | None = None  # stop after this many messages per device
    spread_sources: bool = False  # bind to 127.0.0.2.. as ``iotpipe simulate`` does
    hold: asyncio.Event | None = None  # wait for it after connecting, before sending
    reply_timeout: float = 10.0
    pad: int = 0  # extra bytes of payload per message
    ramp_s: float = 0.0  # spread the first connection attempts over this many seconds
    acked: dict[str, set[str]] = field(default_factory=dict)
    sent: dict[str, set[str]] = field(default_factory=dict)
    acks_seen: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    connected: int = 0
    max_connected: int = 0
    busy: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._device(i, device, stop)
                               for i, device in enumerate(self.tokens)))

    def total_acked(self) -> int:
        return sum(len(ids) for ids in self.acked.values())

    def acked_pairs(self) -> set[tuple[str, str]]:
        return {(d, m) for d, ids in self.acked.items() for m in ids}

    def sent_pairs(self) -> set[tuple[str, str]]:
        return {(d, m) for d, ids in self.sent.items() for m in ids}

    async def _device(self, index: int, device: str, stop: asyncio.Event) -> None:
        acked = self.acked.setdefault(device, set())
        sent = self.sent.setdefault(device, set())
        pending: list[str] = []
        next_n = 0
        failures = 0
        sources = source_addresses(self.url, len(self.tokens), self.spread_sources)
        source = sources[index % len(sources)]
        headers = {"Authorization": f"Bearer {self.tokens[device]}"}
        if self.ramp_s:
            await asyncio.sleep(self.ramp_s * index / max(1, len(self.tokens)))

        def finished() -> bool:
            if pending:
                return False
            return stop.is_set() or (self.per_device is not None and next_n >= self.per_device)

        while not finished():
            try:
                # The port is chosen at connect, not bind (iotpipe_tools.sources).
                sock = None
                if source is not None:
                    async with asyncio.timeout(10):
                        sock = await connect_from(source, self.url)
                async with connect(self.url, additional_headers=headers, open_timeout=10,
                                   close_timeout=1, max_queue=64, sock=sock) as ws:
                    self.connected += 1
                    self.max_connected = max(self.max_connected, self.connected)
                    try:
                        failures = 0
                        if self.hold is not None:
                            await self.hold.wait()
                        while not finished():
                            if not pending:
                                limit = self.per_device if self.per_device is not None else 1 << 62
                                k = min(self.batch, limit - next_n)
                                pending = [f"{device}.{n}" for n in range(next_n, next_n + k)]
                                next_n += k
                                sent.update(pending)
                            frame = [{"id": m, "data": self._data(device, m)} for m in pending]
                            retry_ms, refused = await self._exchange(ws, frame, acked)
                            pending = [m for m in pending if m not in acked and m not in refused]
                            await asyncio.sleep(retry_ms / 1000 if retry_ms else self.interval)
                    finally:
                        self.connected -= 1
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
                self.reconnects += 1
                failures += 1
                backoff = min(1.0, 0.05 * 2 ** min(failures, 5))
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))

    def _data(self, device: str, msg_id: str) -> dict[str, object]:
        data: dict[str, object] = {"n": int(msg_id.rsplit(".", 1)[1]), "device": device}
        for i in range(0, self.pad, 200):  # ingest caps each string value at 256 chars
            data[f"p{i // 200}"] = "x" * min(200, self.pad - i)
        return data

    async def _exchange(self, ws: object, frame: list[dict[str, object]],
                        acked: set[str]) -> tuple[int, set[str]]:
        """Send one batch, read replies until every id is answered.

        Returns a retry hint (busy, rate limited) and the ids refused for good (errors).
        """
        assert hasattr(ws, "send")
        await ws.send(orjson.dumps(frame).decode())  # type: ignore[attr-defined]
        outstanding = {str(m["id"]) for m in frame}
        retry_ms = 0
        refused: set[str] = set()
        while outstanding:
            raw = await asyncio.wait_for(ws.recv(), self.reply_timeout)  # type: ignore[attr-defined]
            reply = orjson.loads(raw)
            ids = {str(i) for i in reply.get("ids", [])}
            kind = reply.get("type")
            if kind == "ack":
                acked.update(ids & outstanding)
                self.acks_seen.update(ids)
            elif kind == "busy" or (kind == "error" and reply.get("reason") == "rate_limited"):
                self.busy += 1
                retry_ms = max(retry_ms, int(reply.get("retry_after_ms", 200)))
            else:
                self.errors[str(reply.get("reason"))] += 1
                if not ids:
                    raise AssertionError(f"unexpected reply {reply}")
                refused |= ids
            outstanding -= ids
        return retry_ms, refused


# -- live clients ------------------------------------------------------------------------


@dataclass
class LiveClient:
    """A relay client that reconnects and keeps each connection's frames apart."""

    url: str
    token: str
    subscription: dict[str, list[str]]
    connections: list[list[dict[str, object]]] = field(default_factory=list)
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            frames: list[dict[str, object]] = []
            try:
                async with connect(self.url, additional_headers={
                        "Authorization": f"Bearer {self.token}"}, open_timeout=5,
                        close_timeout=1) as ws:
                    self.connections.append(frames)
                    await ws.send(orjson.dumps({"op": "subscribe", **self.subscription}).decode())
                    closer = asyncio.create_task(self._close_on(stop, ws))
                    try:
                        async for raw in ws:
                            frame = orjson.loads(raw)
                            if frame.get("event") == "subscribed":
                                self.subscribed.set()
                            frames.append(frame)
                    finally:
                        closer.cancel()
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.2)

    @staticmethod
    async def _close_on(stop: asyncio.Event, ws: object) -> None:
        await stop.wait()
        await ws.close()  # type: ignore[attr-defined]

    def readings(self) -> list[dict[str, object]]:
        return [f for conn in self.connections for f in conn if f.get("event") == "reading"]


def check_live_stream(connections: list[list[dict[str, object]]]) -> dict[str, int]:
    """Per connection and source: seqs strictly increase, and every jump is announced.

    The client's filter must match every reading, so a jump of ``k`` seqs in a source must be
    covered by gap frames: ``upstream`` gaps name their source and range exactly;
    ``slow_client`` gaps only give a count over all sources, so they form a pool that jumps
    in any source may draw on (exact with one source, a tight bound with several).
    Returns totals for the caller to assert on.
    """
    totals = Counter[str]()
    for frames in connections:
        last: dict[str, int] = {}
        upstream_since: dict[str, int] = {}
        slow_pool = 0
        single_source = len({f.get("source") for f in frames
                             if f.get("event") == "reading"}) <= 1
        for frame in frames:
            event = frame.get("event")
            if event == "gap":
                missed = int(frame["missed"])  # type: ignore[call-overload]
                if frame["reason"] == "upstream":
                    source = str(frame["source"])
                    first = int(frame["from_seq"])  # type: ignore[call-overload]
                    assert source not in last or first == last[source] + 1, frame
                    upstream_since[source] = upstream_since.get(source, 0) + missed
                    totals["upstream_missed"] += missed
                else:
                    slow_pool += missed
                    totals["slow_missed"] += missed
            elif event == "reading":
                source, seq = str(frame["source"]), int(frame["seq"])  # type: ignore[call-overload]
                if source in last:
                    assert seq > last[source], f"out of order/duplicate: {seq} after {last[source]}"
                    jump = seq - last[source] - 1
                    upstream = upstream_since.get(source, 0)
                    low = upstream + slow_pool if single_source else upstream
                    assert low <= jump <= upstream + slow_pool, (
                        f"{source}: seq {last[source]} -> {seq} skipped {jump}, gap frames "
                        f"announced {upstream} upstream + {slow_pool} slow_client")
                    slow_pool -= jump - upstream
                    totals["jumps"] += 1 if jump else 0
                last[source] = seq
                upstream_since[source] = 0
                totals["readings"] += 1
    return dict(totals)
