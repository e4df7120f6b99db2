"""Sans-I/O cores of the middle tier: no sockets, no files, no clocks.

Each piece is driven by the I/O shell in ``server.py`` and tested without sockets:

``dedup``
    ``NodeMarks``: per ingest node, the node seqs already stored in the log (a set of
    ranges, see ``IntervalSet`` in ``intervals``), and the marks checkpoint codec.
``intake``
    ``Intake``: batches that arrived together -> one group-commit plan -> ``ack`` or
    ``busy`` replies, including the one-batch-at-a-time fallback when a group does not fit.
``recent``
    ``RecentRecords``: the last appended records, to serve feed deliveries from memory.
``feed``
    ``FeedCore``: credit windows, leases, acks and cursors of the durable storage feed.

This module gathers their public names, so ``from iotpipe.middle.core import ...`` is the
one import of the tier's logic.
"""

from __future__ import annotations

from iotpipe.middle.dedup import (
    CheckpointError,
    MarksCheckpoint,
    NodeMarks,
    decode_checkpoint,
    encode_checkpoint,
)
from iotpipe.middle.feed import ConsumerState, FeedCore, FeedCounters, Lease, UnknownGroup
from iotpipe.middle.intake import (
    Append,
    Intake,
    IntakeCounters,
    IntakePlan,
    PlannedBatch,
    Reply,
)
from iotpipe.middle.intervals import IntervalSet
from iotpipe.middle.recent import RecentRecords
from iotpipe.wire import reading_topic

__all__ = [
    "Append",
    "CheckpointError",
    "ConsumerState",
    "FeedCore",
    "FeedCounters",
    "Intake",
    "IntakeCounters",
    "IntakePlan",
    "IntervalSet",
    "Lease",
    "MarksCheckpoint",
    "NodeMarks",
    "PlannedBatch",
    "RecentRecords",
    "Reply",
    "UnknownGroup",
    "decode_checkpoint",
    "encode_checkpoint",
    "reading_topic",
]
