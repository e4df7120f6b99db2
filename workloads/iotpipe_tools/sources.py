"""Many client connections from one machine: spread over loopback source addresses (one
address has about 28k ephemeral ports) and an open-file limit raised to hold them."""

from __future__ import annotations

import contextlib
import ipaddress
import math
import resource
from urllib.parse import urlsplit

__all__ = ["PORTS_PER_SOURCE", "raise_nofile", "source_addresses"]

PORTS_PER_SOURCE = 20000  # below the ~28k ephemeral ports, leaving room for the rest


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
