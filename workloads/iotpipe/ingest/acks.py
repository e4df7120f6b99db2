"""The reply a frame gets once its durable append is settled, for both WebSocket cores.

An ack only when the commit group is durable; ``busy`` when the queue stayed full for
``busy_wait``; any other failure (``QueueError``, or a bug) is never acked: the device is
told ``internal`` and the connection closes with 1011.
"""

from __future__ import annotations

import asyncio
import logging

from iotpipe.ingest.core import encode_ack_frame, encode_busy_frame, encode_error_frame
from iotpipe.ingest.metrics import IngestCounters
from iotpipe.queue import QueueFull

__all__ = ["settled_reply"]

log = logging.getLogger("iotpipe.ingest")


def settled_reply(durable: asyncio.Future[range], ids: list[str | int], waited: float,
                  counters: IngestCounters, busy_retry_ms: int) -> tuple[bytes, bool]:
    """The reply frame for a frame whose append ``durable`` is done, and whether the queue
    failed (the connection must then close with 1011 after this reply, acking nothing
    more). ``waited``: seconds from reading the frame until now."""
    error = durable.exception()
    if error is None:
        counters.observe_acked(len(ids), waited)
        return encode_ack_frame(ids), False
    if isinstance(error, QueueFull):
        counters.busy += len(ids)
        return encode_busy_frame(ids, busy_retry_ms), False
    log.error("queue append failed", extra={"fields": {"error": str(error)}})
    counters.rejected["internal"] += len(ids)
    return encode_error_frame("internal", list(ids), "the server cannot store messages"), True
