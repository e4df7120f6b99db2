"""The persistent queue: a durable, segmented, group-committed FIFO of opaque payloads.

Every tier of iotpipe keeps its messages here between receiving and forwarding them.
``append`` returns only once its records are durable (fdatasync, or pmem persist on real
persistent memory); consumers read from a seq, acknowledge cumulatively, and space is
reclaimed up to the slowest registered consumer.

One thread that owns a queue's appends may drive the group commit itself instead:
``append_nowait`` places a batch, ``start_write`` writes every placed batch as one group
(on the calling thread, or in the background on a C thread that never takes the GIL, with
``durable_fileno`` to poll), and ``poll_durable`` reports what became durable. The bytes on
disk are the same; nothing is readable or reported durable before its sync.

On-disk format (all integers little-endian)
-------------------------------------------
A queue is a directory::

    LOCK                      flock'ed by the one process that has the queue open
    cursors.ledger            consumer cursors (below)
    00000000000000000001.seg  segment files, named by the seq of their first record
    ...

Segment file: fixed size (``segment_bytes``), preallocated, created as ``NAME.tmp``,
synced, renamed, and the directory synced. Header, 32 bytes::

    magic b"IOTQSEG1" | first_seq u64 | segment_bytes u64 | previous_end u32 | crc32c u32

``previous_end`` is where the records of the previous segment end (0 for the first
segment ever), known because that segment was synced and sealed before this one was
created; it lets depth and reads skip scanning older segments. The CRC32C covers the
28 bytes before it.

then records back to back from offset 32, each 8-byte aligned::

    crc32c u32 | length u32 | seq u64 | payload | zero padding to a multiple of 8

``length`` = 16 + payload length (so it is never 0 for a record); its top bit
(FIRST_IN_WRITE) marks the first record of each write, i.e. the first after a sync point.
The CRC32C (Castagnoli) covers bytes 4.. of the frame: length, seq and payload. The tail
position is never stored: it is where the records stop. Unused space is zeros.

Writes: per group commit and segment, one pwrite + one fdatasync (or, on persistent
memory, one ``pmem_memcpy_persist`` into the segment mapped with ``pmem_map_file``). A
segment is synced before the next segment is created, so only the last segment can have
an unsynced (torn) tail.

Recovery on open scans the last segment from its header and stops at a zero length, a bad
length, a bad checksum or an unexpected seq. If an intact FIRST_IN_WRITE record with a
later seq follows the stop point, the damage is inside synced data: ``QueueCorrupted``.
Otherwise the tail is cut there: every byte after it is overwritten with zeros and synced
(zeros, not truncate + preallocate, so a crash during the cut cannot leave a short file),
so stale bytes never line up after new records. Older segments are checked when first read; any
bad record there, or a gap in seqs between segments, raises ``QueueCorrupted`` naming the
file and offset. A corrupt record is never returned.

Ledger: two 64 KiB slots written alternately, each followed by fdatasync::

    magic b"IOTQLDG1" | crc32c u32 | generation u64 | body_length u32 | body
    body = count u32, then per consumer: acked_seq u64 | name_length u16 | name (UTF-8)

The CRC covers generation, body_length and body; on open the valid slot with the highest
generation wins. A segment is deleted only after a synced ledger shows every registered
consumer past its last record.

Capacity: the sum of segment file sizes never exceeds ``capacity_bytes``; ``segment_bytes``
is capped to half of it (two segments are needed to roll over). Sequence numbers start at
1 and are never reused.

Semantics worth knowing
-----------------------
- Space is reclaimed (whole segments) only up to the slowest *registered* consumer; with no
  consumer registered nothing is ever reclaimed and the queue eventually refuses appends
  with ``QueueFull``. A consumer registered later starts at the oldest retained record.
- ``append`` raises ``QueueFull`` when the batch does not fit in the capacity, or when the
  disk has no room for the next segment; it never overwrites unacknowledged records.
- ``next_seq`` counts appends in flight; ``read`` and ``wait`` see only durable records.
- ``depth().bytes`` counts on-disk bytes (16-byte headers and padding included).
- An I/O error during a group commit (EIO, a failed fdatasync) fails that group and makes
  the queue refuse further use (``QueueError``) until it is reopened: after a failed sync
  the page cache cannot be trusted, and recovery on open is the one safe way back.
- Payloads are ``bytes`` (bytes-like objects with 1-byte items are accepted); ``read``
  returns ``bytes``.
- ``persist="auto"`` uses libpmem only when ``pmem_is_pmem`` is true for the mapped segment.
  ``PMEM_IS_PMEM_FORCE=1`` makes libpmem say so for any file: for tests only, appends are
  then NOT durable (the queue logs a warning at open).
"""

from __future__ import annotations

from .aio import AsyncQueue
from .core import Depth, PersistentQueue
from .errors import QueueClosed, QueueCorrupted, QueueError, QueueFull, QueueLocked
from .fileio import signal_eventfd
from .framing import Record

__all__ = [
    "AsyncQueue",
    "Depth",
    "PersistentQueue",
    "QueueClosed",
    "QueueCorrupted",
    "QueueError",
    "QueueFull",
    "QueueLocked",
    "Record",
    "signal_eventfd",
]
