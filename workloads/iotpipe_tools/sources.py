"""Many client connections from one machine: spread over loopback source addresses (one
address has about 28k ephemeral ports) and an open-file limit raised to hold them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import resource
import socket
from urllib.parse import urlsplit

__all__ = ["PORTS_PER_SOURCE", "bound_socket", "connect_from", "raise_nofile", "source_addresses"]

PORTS_PER_SOURCE = 20000  # below the ~28k ephemeral ports, leaving room for the rest

# Linux's IP_BIND_ADDRESS_NO_PORT (absent from Python's socket module before 3.12).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted`` (root may raise the hard limit); the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    for new_hard in (max(hard, wanted), hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, new_hard), new_hard))
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def source_addresses(url: str, connections: int, spread: bool) -> list[str | None]:
    """Source address per connection slot: 127.0.0.2.. for an IPv4 loopback target."""
    host = urlsplit(url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return [None]
    if not spread or not (address.version == 4 and address.is_loopback):
        return [None]
    count = max(1, math.ceil(connections / PORTS_PER_SOURCE))
    return [f"127.0.0.{2 + i}" for i in range(count)]


def bound_socket(source: str) -> socket.socket:
    """A non-blocking TCP socket bound to ``source`` whose port is chosen at connect().

    ``bind((source, 0))`` alone picks the port at bind time, searching the bind table
    while ignoring the destination: with thousands of sockets (or TIME_WAIT remnants of a
    previous run) on one address each bind costs a scan, and it cannot reuse a port that
    is busy only towards another destination. IP_BIND_ADDRESS_NO_PORT defers the choice
    to connect(), which searches by the whole 4-tuple (docs/benchmarks.md, Connections).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_from(source: str, url: str) -> socket.socket:
    """A TCP connection from ``source`` to ``url``'s host and port, for a WebSocket client.

    Clients pass it as ``sock=`` instead of ``local_addr=(source, 0)``, which would pick
    the port at bind time (see ``bound_socket``). Callers bound it with ``asyncio.timeout``.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme in ("wss", "https") else 80)
    sock = bound_socket(source)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (parts.hostname or "", port))
    except BaseException:
        sock.close()
        raise
    return sock
