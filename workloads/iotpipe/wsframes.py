"""Server-to-client WebSocket frames written straight to a transport.

The edge tiers (ingest's picows front, the relay's fan-out) frame several payloads into one
buffer and write it with one call; both need the same few lines of RFC 6455, so they live
here rather than in either tier (the tiers never import each other).
"""

from __future__ import annotations

import struct

__all__ = ["encode_text_frames"]

_HEADER_SHORT = struct.Struct("!BB")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")


def encode_text_frames(payloads: list[bytes]) -> bytes:
    """Server-to-client text frames (FIN, unmasked, RFC 6455 5.2) joined for one write."""
    parts: list[bytes] = []
    for payload in payloads:
        size = len(payload)
        if size < 126:
            parts.append(_HEADER_SHORT.pack(0x81, size))
        elif size < 65536:
            parts.append(_HEADER_16.pack(0x81, 126, size))
        else:
            parts.append(_HEADER_64.pack(0x81, 127, size))
        parts.append(payload)
    return b"".join(parts)
