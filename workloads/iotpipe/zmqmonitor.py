"""The events waiting on a ZeroMQ monitor socket, read without blocking.

The middle counts failed CURVE handshakes from its monitors and the relay tracks which
middles its SUB socket is connected to; both read the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

__all__ = ["pending_events"]

_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq's enum flags cost microseconds per call


def pending_events(monitor: zmq.Socket[bytes]) -> Iterator[dict[str, Any]]:
    """Each event queued on ``monitor`` now (a malformed one is skipped)."""
    while True:
        try:
            message = monitor.recv_multipart(_NOBLOCK)
        except zmq.Again:
            return
        try:
            event = parse_monitor_message(message)
        except RuntimeError:
            continue
        yield event
