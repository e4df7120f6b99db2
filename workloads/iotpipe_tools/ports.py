"""Free loopback ports for the servers tests and benchmarks start, each handed out once
per process."""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["free_port", "free_port_block"]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports are handed out below the ephemeral range: a port taken from the ephemeral range can
# be grabbed by any outgoing connection (a simulator opening thousands) before the server
# that was meant to bind it starts. Ports handed out once are not handed out again.
_PORT_RANGE = (10000, max(10001, _ephemeral_low()))
_handed_out: set[int] = set()


def free_port_block(count: int = 1, host: str = "127.0.0.1") -> int:
    """A base port with ``count`` consecutive ports free on ``host`` right now."""
    rng = random.Random()
    for _ in range(500):
        base = rng.randrange(_PORT_RANGE[0], _PORT_RANGE[1] - count)
        ports = range(base, base + count)
        if _handed_out.intersection(ports):
            continue
        sockets: list[socket.socket] = []
        try:
            for port in ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        _handed_out.update(ports)
        return base
    raise RuntimeError("no block of free ports found below the ephemeral range")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now, outside the ephemeral port range."""
    return free_port_block(1, host)
