"""Live publishing policy of the middle (sans-I/O): which PUB messages a commit group makes.

v2 (the default) sends one message per commit group, split into messages of at most
``group_records`` readings so a subscriber's queue stays bounded in records: the PUB
high-water mark counts messages, so the socket's limit is ``pub_hwm / group_records``
messages and a stuck subscriber holds about ``pub_hwm`` records either way. v1 sends one
message per record (``hot.live_frames``), for relays older than the v2 format.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from iotpipe import wire
from iotpipe.middle import hot

__all__ = ["LiveFormat", "group_messages", "pub_sndhwm"]

LiveFormat = Literal["v1", "v2"]


def pub_sndhwm(pub_hwm: int, live_format: LiveFormat, group_records: int) -> int:
    """The PUB socket's SNDHWM (messages) that holds about ``pub_hwm`` records."""
    if live_format == "v1":
        return pub_hwm
    return max(1, -(-pub_hwm // group_records))


def group_messages(middle_id: str, first: int, readings: Sequence[bytes],
                   group_records: int) -> list[list[bytes]]:
    """The v2 messages of a group appended at log seqs ``first ..``, in seq order."""
    if len(readings) <= group_records:  # the common case: no slicing copies
        return [wire.encode_live_group(middle_id, first, readings, hot.pack_bins)]
    return [wire.encode_live_group(middle_id, first + start,
                                   readings[start:start + group_records], hot.pack_bins)
            for start in range(0, len(readings), group_records)]
