"""The middle's per-record work: ``_hot.c`` when built, else ``iotpipe.wire`` and msgpack.

Both give the same bytes (the tests compare them). The C module makes a whole group one
call instead of a Python call per record for the log records and the v1 live-event frames
(``--live-format v1``), decodes a v2 batch in the form ingest writes it in one call
(anything else goes to ``wire.decode_batch``, which gives the same result or names the
error), packs the bodies of v2 live groups and feed deliveries (``pack_bins``: msgpack's
Packer spends most of its time dispatching on each item's type) and sums record sizes for
the recent-records budget (``total_bytes``).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgpack

from iotpipe import wire

_packb = msgpack.Packer(use_bin_type=True).pack

__all__ = ["BUILT", "decode_batch", "live_frames", "log_records", "pack_bins", "total_bytes"]


def _log_records_py(node: str, first: int, readings: list[bytes]) -> list[bytes]:
    return wire.encode_log_records(node, first, readings)


def _pack_bins_py(items: list[bytes]) -> bytes:
    return _packb(items)


def _total_bytes_py(items: list[bytes]) -> int:
    return sum(map(len, items))


def _live_frames_py(prefix: bytes, first: int, readings: list[bytes]
                    ) -> list[tuple[bytes, bytes, bytes]]:
    """(topic, meta, reading) per reading with a device id; the others are left out."""
    topics = map(wire.reading_topic, readings)
    metas = wire.live_metas(prefix, first)  # endless: strict=False
    return [(topic, meta, reading)
            for topic, meta, reading in zip(topics, metas, readings, strict=False)
            if topic is not None]


def _decode_batch_c(frames: Sequence[bytes]) -> wire.Batch:
    if len(frames) == 3 and frames[0] == wire.KIND_BATCH_V2:
        header, body = frames[1], frames[2]
        if type(header) is bytes and type(body) is bytes:
            fast = decode_batch_v2(header, body)
            if fast is not None:
                return wire.Batch(*fast)
    return wire.decode_batch(frames)


try:
    from iotpipe.middle._hot import (
        decode_batch_v2,
        live_frames,
        log_records,
        pack_bins,
        total_bytes,
    )
    decode_batch = _decode_batch_c
    BUILT = True
except ImportError:  # not built (no compiler at install): the same output, slower
    log_records = _log_records_py
    live_frames = _live_frames_py
    decode_batch = wire.decode_batch
    pack_bins = _pack_bins_py
    total_bytes = _total_bytes_py
    BUILT = False
