"""The middle's per-record encoding of a group: ``_hot.c`` when built, else ``iotpipe.wire``.

Both give the same bytes (the tests compare them). The C module makes a whole group one
call instead of a Python call per record for the log records and the live-event frames.
"""

from __future__ import annotations

from iotpipe import wire

__all__ = ["BUILT", "live_frames", "log_records"]


def _log_records_py(node: str, first: int, readings: list[bytes]) -> list[bytes]:
    return wire.encode_log_records(node, first, readings)


def _live_frames_py(prefix: bytes, first: int, readings: list[bytes]
                    ) -> list[tuple[bytes, bytes, bytes]]:
    """(topic, meta, reading) per reading with a device id; the others are left out."""
    topics = map(wire.reading_topic, readings)
    metas = wire.live_metas(prefix, first)  # endless: strict=False
    return [(topic, meta, reading)
            for topic, meta, reading in zip(topics, metas, readings, strict=False)
            if topic is not None]


try:
    from iotpipe.middle._hot import live_frames, log_records
    BUILT = True
except ImportError:  # not built (no compiler at install): the same output, slower
    log_records = _log_records_py
    live_frames = _live_frames_py
    BUILT = False
