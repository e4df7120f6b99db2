"""The middle's per-record work: ``_hot.c`` when built, else ``iotpipe.wire`` and msgpack.

Both give the same bytes (the tests compare them). With the C module a group's readings and
log records never become a Python object each: a v2 batch decodes to a ``PayloadRun`` of
spans over its body (``decode_batch``), a group's log records are built into one buffer
(``log_run``), the readings to publish are spans of that buffer (``record_readings``), the
queue frames the run directly, and the bodies of v2 live groups and feed deliveries are
packed from runs (``pack_bins``, ``pack_runs``: msgpack's Packer spends most of its time
dispatching on each item's type). Allocating and freeing two objects per reading was about
a sixth of the middle's CPU at batch 512. Without the C module the same functions take and
give lists of bytes.

Anything but a v2 batch in the form ingest writes it goes to ``wire.decode_batch``, which
gives the same readings (as a list) or names the error. ``live_frames`` makes the v1
live-event frames (``--live-format v1``) of a group in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import msgpack

from iotpipe import wire

_packb = msgpack.Packer(use_bin_type=True).pack

__all__ = ["BUILT", "LogPart", "count_within", "decode_batch", "live_frames", "log_run",
           "pack_bins", "pack_runs", "record_readings", "total_bytes"]

# The log records of ``readings`` at node seqs ``first ..`` of ``node``.
LogPart = tuple[str, int, Sequence[bytes]]


def _log_run_py(parts: list[LogPart]) -> list[bytes]:
    records: list[bytes] = []
    for node, first, readings in parts:
        records += wire.encode_log_records(node, first, readings)
    return records


def _record_readings_py(records: Sequence[bytes]) -> list[bytes]:
    return [wire.decode_log_record(record).reading for record in records]


def _pack_bins_py(items: Sequence[bytes]) -> bytes:
    return _packb(items if isinstance(items, list) else list(items))


def _pack_runs_py(parts: list[Sequence[bytes]]) -> bytes:
    return _packb(list(chain.from_iterable(parts)))


def _total_bytes_py(items: Sequence[bytes]) -> int:
    return sum(map(len, items))


def _count_within_py(items: Sequence[bytes], max_bytes: int) -> int:
    used = 0
    for count, item in enumerate(items):
        used += len(item)
        if used > max_bytes:
            return count
    return len(items)


def _live_frames_py(prefix: bytes, first: int, readings: list[bytes]
                    ) -> list[tuple[bytes, bytes, bytes]]:
    """(topic, meta, reading) per reading with a device id; the others are left out."""
    topics = map(wire.reading_topic, readings)
    metas = wire.live_metas(prefix, first)  # endless: strict=False
    return [(topic, meta, reading)
            for topic, meta, reading in zip(topics, metas, readings, strict=False)
            if topic is not None]


def _log_run_c(parts: list[LogPart]) -> Sequence[bytes]:
    try:
        return _log_run(parts)
    except OverflowError:  # 4 GiB or more in one group (a run's spans are 32-bit)
        return _log_run_py(parts)


def _record_readings_c(records: Sequence[bytes]) -> Sequence[bytes]:
    if type(records) is PayloadRun:
        return _record_readings(records)
    return _record_readings_py(records)  # a list: what _log_run_c gave for a huge group


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
        count_within,
        decode_batch_v2,
        live_frames,
        pack_bins,
        pack_runs,
        total_bytes,
    )
    from iotpipe.middle._hot import log_run as _log_run
    from iotpipe.middle._hot import record_readings as _record_readings
    from iotpipe.queue.framing import PayloadRun

    log_run = _log_run_c
    record_readings = _record_readings_c
    decode_batch = _decode_batch_c
    BUILT = True
except ImportError:  # not built (no compiler at install): the same output, slower
    log_run = _log_run_py
    record_readings = _record_readings_py
    live_frames = _live_frames_py
    decode_batch = wire.decode_batch
    pack_bins = _pack_bins_py
    pack_runs = _pack_runs_py
    total_bytes = _total_bytes_py
    count_within = _count_within_py
    BUILT = False
