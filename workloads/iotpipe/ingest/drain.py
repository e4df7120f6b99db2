"""``iotpipe drain``: forward a retained ingest queue to the middle tier until it is empty.

Used by the operator's drain Job after an ingest pod was scaled away before its queue was
empty (or crashed): it opens every ``<data_dir>/p<i>`` queue, runs one forwarder per queue
with node id ``<node_id>-p<i>~<incarnation>`` (the same identity the pod used, read from
the queue directory, so the middle tier deduplicates anything that pod already delivered)
and exits 0 once every queue is empty, 1 if ``timeout`` ran out first (nothing is lost:
the queues stay on disk), 2 on bad input.
"""

from __future__ import annotations

import logging
import re
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from iotpipe.ingest.forwarder import CONSUMER, Forwarder
from iotpipe.ingest.identity import queue_node_id
from iotpipe.observability import setup_logging
from iotpipe.queue import PersistentQueue, QueueError
from iotpipe.settings import CommaList, LogLevel, TierSettings, parse_settings, tier_config

__all__ = ["DrainSettings", "drain_queues", "main"]

log = logging.getLogger("iotpipe.drain")
_PROCESS_DIR = re.compile(r"p(\d+)")


class DrainSettings(TierSettings):
    """Forward every retained ingest queue under data_dir to the middle tier, then exit."""

    model_config = tier_config("iotpipe drain", "IOTPIPE_DRAIN_")

    data_dir: Path = Field(Path("/var/lib/iotpipe/queue"), description="ingest queue directory")
    node_id: str = Field(default_factory=socket.gethostname,
                         description="node identity of the ingest pod that wrote the queue")
    middle_endpoints: CommaList = Field(default_factory=list,
                                        description="middle ROUTER endpoints, comma separated")
    timeout: float = Field(600.0, gt=0, description="seconds to wait for the queues to empty")
    log_level: LogLevel = Field("info", description="debug, info, warning, error or critical")
    queue_bytes: int = Field(1 << 30, gt=0, description="capacity to open the queues with")


def process_dirs(data_dir: Path) -> list[tuple[int, Path]]:
    """The ``p<i>`` queue directories under ``data_dir``, by index."""
    found = []
    if data_dir.is_dir():
        for entry in data_dir.iterdir():
            match = _PROCESS_DIR.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def drain_queues(data_dir: Path, node_id: str, endpoints: Sequence[str], timeout: float,
                 queue_bytes: int = 1 << 30) -> bool:
    """Forward every queue under ``data_dir``; True when all are empty within ``timeout``."""
    deadline = time.monotonic() + timeout
    queues: list[PersistentQueue] = []
    forwarders: list[Forwarder] = []
    try:
        for index, path in process_dirs(data_dir):
            queue = PersistentQueue.open(path, capacity_bytes=queue_bytes, consumers=(CONSUMER,))
            queues.append(queue)
            node = queue_node_id(path, f"{node_id}-p{index}")
            depth = queue.depth()
            log.info("draining queue", extra={"fields": {
                "path": str(path), "node": node, "records": depth.records}})
            forwarders.append(Forwarder(queue, node, endpoints).start())
        return all(f.wait_empty(max(0.0, deadline - time.monotonic())) for f in forwarders)
    finally:
        for forwarder in forwarders:
            forwarder.stop()
        for queue in queues:
            queue.close()


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(DrainSettings, argv)
    setup_logging("drain", settings.log_level)
    if not settings.middle_endpoints:
        print("iotpipe drain: error: --middle-endpoints is required", file=sys.stderr)
        return 2
    bad = [e for e in settings.middle_endpoints if not e.startswith(("tcp://", "ipc://"))]
    if bad:
        print(f"iotpipe drain: error: --middle-endpoints: {bad[0]!r} is not a ZeroMQ endpoint "
              "(expected tcp://HOST:PORT)", file=sys.stderr)
        return 2
    if not settings.data_dir.is_dir():
        print(f"iotpipe drain: error: {settings.data_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        empty = drain_queues(settings.data_dir, settings.node_id, settings.middle_endpoints,
                             settings.timeout, settings.queue_bytes)
    except QueueError as exc:
        print(f"iotpipe drain: error: {exc}", file=sys.stderr)
        return 2
    log.info("drain done", extra={"fields": {"empty": empty}})
    return 0 if empty else 1
