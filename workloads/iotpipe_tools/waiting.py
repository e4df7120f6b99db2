"""The one bounded poll of tools and tests: wait for the exact thing, never sleep-and-hope.

``wait_for`` blocks, ``eventually`` awaits; both poll ``check`` until it returns something
truthy and hand that value back, fail fast when ``abort`` reports a reason (a child process
exited), and raise :class:`NotReady` with ``what`` and ``details()`` (usually logs) when the
deadline passes. ``wait_ready`` and ``wait_port`` are the two readiness checks every
benchmark and process test needs: a ``/readyz`` answering 200, a port accepting connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

__all__ = ["NotReady", "Poll", "eventually", "exited", "http_status", "port_open", "wait_for",
           "wait_port", "wait_ready"]

T = TypeVar("T")

# Readiness is always asked of loopback servers: a proxy from the environment must not answer.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class NotReady(AssertionError):
    """A wait gave up. An AssertionError, so a test's wait fails as a failed assertion."""


class Poll:
    """One bounded poll: each ``attempt`` returns the check's truthy value, or None to retry."""

    def __init__(self, check: Callable[[], object], within: float, what: str,
                 abort: Callable[[], str | None] | None = None,
                 details: Callable[[], str] | None = None) -> None:
        self._check = check
        self._within = within
        self._what = what
        self._abort = abort
        self._details = details
        self._deadline = time.monotonic() + within

    def attempt(self) -> object | None:
        value = self._check()
        if value:
            return value
        if self._abort is not None and (reason := self._abort()):
            raise NotReady(f"{reason} while waiting for {self._what}{self._more()}")
        if time.monotonic() >= self._deadline:
            raise NotReady(
                f"timed out after {self._within}s waiting for {self._what}{self._more()}")
        return None

    def _more(self) -> str:
        return f"\n{self._details()}" if self._details is not None else ""


def wait_for(check: Callable[[], T], within: float, what: str, *, interval: float = 0.05,
             abort: Callable[[], str | None] | None = None,
             details: Callable[[], str] | None = None) -> T:
    """Block until ``check()`` is truthy and return it; NotReady after ``within`` s."""
    poll = Poll(check, within, what, abort, details)
    while (value := poll.attempt()) is None:
        time.sleep(interval)
    return value  # type: ignore[return-value]


async def eventually(check: Callable[[], T], within: float, what: str, *,
                     interval: float = 0.1, abort: Callable[[], str | None] | None = None,
                     details: Callable[[], str] | None = None) -> T:
    """``wait_for`` for coroutines: the event loop keeps running between attempts."""
    poll = Poll(check, within, what, abort, details)
    while True:
        value = poll.attempt()
        if value is not None:
            return value  # type: ignore[return-value]
        await asyncio.sleep(interval)


def exited(proc: object, name: str) -> Callable[[], str | None]:
    """An ``abort`` check: the reason when the child process ``proc`` has exited."""
    def reason() -> str | None:
        code = proc.poll()  # type: ignore[attr-defined]
        return None if code is None else f"{name} exited with {code}"
    return reason


def http_status(url: str, timeout: float = 2.0) -> int:
    """The HTTP status of GET ``url``; 0 when nothing answers."""
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def wait_ready(url: str, within: float = 30.0, *, what: str = "",
               abort: Callable[[], str | None] | None = None,
               details: Callable[[], str] | None = None) -> None:
    """Wait until GET ``url`` (a ``/readyz``) answers 200."""
    wait_for(lambda: http_status(url, timeout=1) == 200, within, what or f"{url} to be ready",
             abort=abort, details=details)


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port`` right now."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout):
        return True
    return False


def wait_port(port: int, within: float = 30.0, *, host: str = "127.0.0.1", what: str = "",
              abort: Callable[[], str | None] | None = None,
              details: Callable[[], str] | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections."""
    wait_for(lambda: port_open(port, host), within, what or f"a listener on {host}:{port}",
             abort=abort, details=details)
