"""One device connection's protocol state, sans-I/O: frames in, readings and replies out.

The I/O shell (``iotpipe.ingest.server``) feeds each received frame to
``DeviceSession.on_frame`` together with the time, appends the returned readings to the
queue, acks them after the append is durable, sends the returned error frames, and closes
the connection when told to.
"""

from __future__ import annotations

from iotpipe.ingest.core.frames import (
    RATE_LIMITED,
    FrameLimits,
    encode_error_frame,
    parse_frame,
)
from iotpipe.ingest.core.ratelimit import TokenBucket

__all__ = ["CLOSE_FLOOD", "CLOSE_GOING_AWAY", "CLOSE_INTERNAL", "CLOSE_TOO_BIG",
           "DeviceSession", "FrameOutcome"]

# WebSocket close codes used by ingest (RFC 6455 section 7.4.1).
CLOSE_GOING_AWAY = 1001   # drain / shutdown: reconnect (to another pod)
CLOSE_FLOOD = 1008        # policy violation: too many consecutive rate-limited frames
CLOSE_TOO_BIG = 1009      # frame larger than max_frame_bytes (sent by websockets itself)
CLOSE_INTERNAL = 1011     # the server cannot store messages (queue broken)


class FrameOutcome:
    """What to do with one frame: store ``readings`` (then ack ``ids``), send ``replies``.

    ``rejected``: reason -> count, for metrics. A plain class: one is built per frame.
    """

    __slots__ = ("close", "ids", "readings", "rejected", "replies")

    def __init__(self, ids: list[str | int], readings: list[bytes],
                 replies: list[bytes] | None = None, close: tuple[int, str] | None = None,
                 rejected: dict[str, int] | None = None) -> None:
        self.ids = ids
        self.readings = readings
        self.replies = [] if replies is None else replies
        self.close = close
        self.rejected = {} if rejected is None else rejected


class DeviceSession:
    """Validation, per-device rate limit and flood policy for one connection.

    ``bucket`` may be shared by every connection of the same device in this process.
    A frame that had any message refused with ``rate_limited`` counts toward the flood
    limit; a frame with none resets the count. After ``flood_limit`` such frames in a row
    the outcome says: close with 1008.
    """

    def __init__(
        self,
        device_id: str | None,
        *,
        bucket: TokenBucket | None = None,
        limits: FrameLimits = FrameLimits(),  # noqa: B008 - frozen
        flood_limit: int = 20,
    ) -> None:
        self.device_id = device_id
        self.bucket = bucket
        self.limits = limits
        self.flood_limit = flood_limit
        self.consecutive_limited = 0

    def on_frame(self, frame: str | bytes, now_s: float, received_ns: int) -> FrameOutcome:
        parsed = parse_frame(frame, self.device_id, received_ns, self.limits)
        out = FrameOutcome(parsed.ids, parsed.readings)
        if parsed.errors:
            replies, rejected = out.replies, out.rejected
            for err in parsed.errors:
                replies.append(encode_error_frame(err.reason, [err.msg_id], err.detail))
                rejected[err.reason] = rejected.get(err.reason, 0) + 1
        if self.bucket is None:
            return out
        # A frame costs at least one token even when every message in it was bad, so a
        # flood of garbage is limited too.
        wanted = max(1, len(out.ids))
        granted = self.bucket.take(wanted, now_s)
        if granted >= wanted or (not out.ids and granted == 1):
            self.consecutive_limited = 0
            return out
        limited_ids = out.ids[granted:]
        retry = self.bucket.retry_after_ms(max(1, len(limited_ids)), now_s)
        out.ids = out.ids[:granted]
        out.readings = out.readings[:granted]
        if limited_ids:
            out.replies.append(encode_error_frame(
                RATE_LIMITED, list(limited_ids), "per-device rate limit", retry_after_ms=retry
            ))
            out.rejected[RATE_LIMITED] = out.rejected.get(RATE_LIMITED, 0) + len(limited_ids)
        self.consecutive_limited += 1
        if self.consecutive_limited >= self.flood_limit:
            out.close = (CLOSE_FLOOD, "rate limit exceeded")
        return out

