"""Sans-I/O protocol cores of the ingest tier: device frames, rate limits, forwarding.

Nothing here touches a socket or reads a clock; servers are thin I/O shells around it.
"""

from iotpipe.protocol.forwarder import ForwarderCore, Send, preferred_endpoint
from iotpipe.protocol.frames import (
    FrameLimits,
    MessageError,
    ParsedFrame,
    encode_ack_frame,
    encode_busy_frame,
    encode_error_frame,
    parse_frame,
    parse_ts,
)
from iotpipe.protocol.ratelimit import TokenBucket
from iotpipe.protocol.session import (
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
