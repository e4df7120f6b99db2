"""The ingest tier's core, sans-I/O: device frames, sessions, rate limits, forwarding.

Nothing here touches a socket or reads a clock; servers are thin I/O shells around it.
"""

from iotpipe.ingest.core.forwarder import ForwarderCore, Send, preferred_endpoint
from iotpipe.ingest.core.frames import (
    FrameLimits,
    MessageError,
    ParsedFrame,
    encode_ack_frame,
    encode_busy_frame,
    encode_error_frame,
    parse_frame,
    parse_ts,
)
from iotpipe.ingest.core.ratelimit import DeviceBuckets, TokenBucket
from iotpipe.ingest.core.session import (
    CLOSE_FLOOD,
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_TOO_BIG,
    DeviceSession,
    FrameOutcome,
)

__all__ = [
    "CLOSE_FLOOD",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_TOO_BIG",
    "DeviceBuckets",
    "DeviceSession",
    "ForwarderCore",
    "FrameLimits",
    "FrameOutcome",
    "MessageError",
    "ParsedFrame",
    "Send",
    "TokenBucket",
    "encode_ack_frame",
    "encode_busy_frame",
    "encode_error_frame",
    "parse_frame",
    "parse_ts",
    "preferred_endpoint",
]
