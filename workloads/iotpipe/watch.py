"""``iotpipe watch``: print live readings from the relay, one line each (like ``mosquitto_sub``).

It is an ordinary client app of the relay (``/v1/live``, see docs/protocols.md): it
subscribes to everything unless told which devices, prefixes, classes or locations to
follow, prints every ``reading`` frame, reports ``gap`` and ``reset`` frames on stderr, and
reconnects with backoff when the relay goes away (readings sent meanwhile are in storage,
not replayed). A refused handshake exits 1 with the relay's reason.

The token is ``--token``, or minted here for ``--app-id`` from the shared secret
(``IOTPIPE_AUTH_SECRET`` or the file named by ``IOTPIPE_AUTH_SECRET_FILE``); ``--insecure``
sends none (a relay run with ``--insecure-no-auth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import orjson
from pydantic import Field
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from iotpipe.auth import CLIENT_AUDIENCE, issue_token, load_secret
from iotpipe.settings import CommaList, TierSettings, parse_settings, tier_config

__all__ = ["WatchSettings", "format_reading", "main", "subscribe_frame"]


class WatchSettings(TierSettings):
    """Print live readings from the relay; with no filter, every device."""

    model_config = tier_config("iotpipe watch", "IOTPIPE_WATCH_", {"json_output": "json"})

    url: str = Field("ws://127.0.0.1:8081/v1/live", description="relay WebSocket URL")
    devices: CommaList = Field(default_factory=list, description="device ids to follow")
    prefixes: CommaList = Field(default_factory=list, description="device id prefixes to follow")
    classes: CommaList = Field(default_factory=list,
                               description="registry classes to follow (e.g. thermometer)")
    locations: CommaList = Field(default_factory=list, description="registry locations to follow")
    count: int = Field(0, ge=0, description="exit after this many readings (0: run until "
                                            "Ctrl-C)")
    token: str = Field("", description="client token (default: minted for --app-id from the "
                                       "shared secret)")
    app_id: str = Field("iotpipe-watch", min_length=1, description="client id in the token")
    insecure: bool = Field(False, description="send no token (relay run with "
                                              "--insecure-no-auth)")
    json_output: bool = Field(False, description="print each frame as one JSON line "
                                                 "(also --json)")


def subscribe_frame(settings: WatchSettings) -> bytes:
    """The subscribe frame for the filters given; everything when none is."""
    filters = {name: values for name in ("devices", "prefixes", "classes", "locations")
               if (values := getattr(settings, name))}
    return orjson.dumps({"op": "subscribe", **(filters or {"all": True})})


def format_reading(frame: dict[str, Any]) -> str:
    """One line: receive time (UTC), device, message id, data."""
    received = frame.get("received")
    if isinstance(received, int):
        stamp = time.strftime("%H:%M:%S", time.gmtime(received / 1e9)) + \
            f".{received // 1_000_000 % 1000:03d}"
    else:
        stamp = "--:--:--.---"
    data = orjson.dumps(frame.get("data"), option=orjson.OPT_SORT_KEYS).decode()
    return f"{stamp}  {frame.get('device')}  {frame.get('id')}  {data}"


class _Refused(Exception):
    pass


async def _session(settings: WatchSettings, headers: dict[str, str], seen: list[int],
                   out: TextIO, err: TextIO) -> None:
    """One connection: subscribe, print until it closes or --count is reached."""
    async with connect(settings.url, additional_headers=headers, open_timeout=10,
                       max_size=1 << 22) as ws:
        await ws.send(subscribe_frame(settings).decode())
        async for message in ws:
            frame = orjson.loads(message)
            event = frame.get("event")
            if event == "reading":
                seen[0] += 1
                print(orjson.dumps(frame).decode() if settings.json_output
                      else format_reading(frame), file=out, flush=True)
                if settings.count and seen[0] >= settings.count:
                    return
            elif event == "error":
                raise _Refused(f"relay refused the subscription: {frame.get('reason')}: "
                               f"{frame.get('detail')}")
            elif event in ("gap", "reset"):
                print(f"iotpipe watch: {event}: {orjson.dumps(frame).decode()}", file=err,
                      flush=True)
            elif settings.json_output:  # subscribed / unsubscribed confirmations
                print(orjson.dumps(frame).decode(), file=out, flush=True)


async def watch(settings: WatchSettings, stop: asyncio.Event, out: TextIO = sys.stdout,
                err: TextIO = sys.stderr) -> int:
    """Run until ``stop`` is set or ``--count`` readings were printed; the exit status."""
    headers: dict[str, str] = {}
    if not settings.insecure:
        token = settings.token
        if not token:
            try:
                token = issue_token(load_secret(), settings.app_id, CLIENT_AUDIENCE, 86400)
            except (RuntimeError, ValueError) as exc:
                print(f"iotpipe watch: error: give --token or --insecure; {exc}", file=err)
                return 2
        headers["Authorization"] = f"Bearer {token}"
    seen = [0]
    backoff = 0.5
    stopper = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set():
            session = asyncio.create_task(_session(settings, headers, seen, out, err))
            await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                session.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await session
                return 0
            try:
                session.result()
                return 0  # --count reached
            except InvalidStatus as exc:
                body = exc.response.body.decode(errors="replace").strip()
                print(f"iotpipe watch: error: {settings.url} refused the connection: HTTP "
                      f"{exc.response.status_code} {body}", file=err)
                if exc.response.status_code != 503:  # 503: relay full; others are final
                    return 1
            except _Refused as exc:
                print(f"iotpipe watch: error: {exc}", file=err)
                return 1
            except (OSError, TimeoutError, ConnectionClosed) as exc:
                print(f"iotpipe watch: {settings.url}: {exc or type(exc).__name__}; "
                      f"reconnecting in {backoff:.1f}s", file=err, flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 10.0)
        return 0
    finally:
        stopper.cancel()


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(WatchSettings, argv)

    async def _run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        return await watch(settings, stop)

    return asyncio.run(_run())
