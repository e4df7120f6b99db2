"""``iotpipe drain``: forward a retained ingest queue to the middle tier until it is empty.

Used by the operator's drain Job after an ingest pod was scaled away before its queue was
empty (or crashed): it opens every ``<data_dir>/p<i>`` queue, runs one forwarder per queue
with node id ``<node_id>-p<i>~<incarnation>`` (the same identity the pod used, read from
the queue directory, so the middle tier deduplicates anything that pod already delivered)
and exits 0 once every queue is empty, 1 if ``timeout`` ran out first (nothing is lost:
the queues stay on disk), 2 on bad input.

``--middle-endpoints-file`` (the operator's mounted endpoints ConfigMap, key ``router``) is
re-read every ``--endpoints-reload-seconds`` while draining, so a drain Job follows a
middle tier that scales meanwhile.

``QueueDrainer`` is the same forwarding for one queue directory, used by an ingest pod
that finds queues of processes it no longer runs (``--processes`` was lowered): it
forwards under the queue's own identity and removes the directory only once it is empty.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field

from iotpipe.curve import CurveKeyError, CurveKeys, load_keys
from iotpipe.durable import fsync_dir
from iotpipe.endpoints import EndpointsError, EndpointsFile
from iotpipe.ingest.forwarder import CONSUMER, Forwarder
from iotpipe.ingest.identity import queue_node_id
from iotpipe.ingest.settings import IngestQueueSettings, MiddleEndpointsSettings
from iotpipe.observability import setup_logging
from iotpipe.queue import PersistentQueue, QueueError
from iotpipe.settings import CurveSettings, LogSettings, parse_settings, tier_config

__all__ = ["DrainSettings", "QueueDrainer", "drain_queues", "main", "process_dirs",
           "remove_queue_dir"]

log = logging.getLogger("iotpipe.drain")
_PROCESS_DIR = re.compile(r"p(\d+)")
# A drained queue directory is renamed to this first (atomic), then deleted: a crash
# mid-delete leaves a name that is never opened as a queue again, only cleaned up.
REMOVED_SUFFIX = ".removed-"


class DrainSettings(CurveSettings, MiddleEndpointsSettings, IngestQueueSettings, LogSettings):
    """Forward every retained ingest queue under data_dir to the middle tier, then exit."""

    model_config = tier_config("iotpipe drain", "IOTPIPE_DRAIN_")

    timeout: float = Field(600.0, gt=0, description="seconds to wait for the queues to empty")


def process_dirs(data_dir: Path) -> list[tuple[int, Path]]:
    """The ``p<i>`` queue directories under ``data_dir``, by index."""
    found = []
    if data_dir.is_dir():
        for entry in data_dir.iterdir():
            match = _PROCESS_DIR.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def remove_queue_dir(path: Path) -> None:
    """Delete a drained (closed) queue directory: rename first, so no crash leaves a
    half-deleted directory that would be opened as a queue."""
    doomed = path.with_name(f"{path.name}{REMOVED_SUFFIX}{secrets.token_hex(4)}")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(data_dir: Path) -> None:
    """Finish deletions a crash interrupted (directories renamed by ``remove_queue_dir``)."""
    if data_dir.is_dir():
        for entry in data_dir.iterdir():
            if REMOVED_SUFFIX in entry.name and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)


class QueueDrainer:
    """Forwards one retained queue directory ``p<index>`` under its own node identity."""

    def __init__(self, path: Path, index: int, node_id: str, endpoints: Sequence[str],
                 queue_bytes: int = 1 << 30, curve_keys: CurveKeys | None = None) -> None:
        self.path = path
        self.name = path.name
        self.queue = PersistentQueue.open(path, capacity_bytes=queue_bytes,
                                          consumers=(CONSUMER,))
        try:
            self.node = queue_node_id(path, f"{node_id}-p{index}")
            self.forwarder = Forwarder(self.queue, self.node, endpoints,
                                       curve_keys=curve_keys)
        except BaseException:
            self.queue.close()
            raise
        log.info("draining queue", extra={"fields": {
            "path": str(path), "node": self.node, "records": self.queue.depth().records}})
        self.forwarder.start()

    def depth(self) -> tuple[int, int, int]:
        depth = self.queue.depth()
        return (depth.records, depth.bytes, self.queue.capacity_bytes)

    def is_empty(self) -> bool:
        return self.forwarder.is_empty()

    def close(self, remove_if_empty: bool = False) -> bool:
        """Stop forwarding and close; with ``remove_if_empty``, delete the directory when
        everything in it was acknowledged by a middle. True if it was removed."""
        self.forwarder.stop()
        empty = self.forwarder.is_empty()
        self.queue.close()
        if remove_if_empty and empty:
            remove_queue_dir(self.path)
            log.info("drained queue removed", extra={"fields": {
                "path": str(self.path), "node": self.node}})
            return True
        return False


def drain_queues(data_dir: Path, node_id: str, endpoints: Sequence[str], timeout: float,
                 queue_bytes: int = 1 << 30, endpoints_file: EndpointsFile | None = None,
                 reload_seconds: float = 2.0, curve_keys: CurveKeys | None = None) -> bool:
    """Forward every queue under ``data_dir``; True when all are empty within ``timeout``.

    With ``endpoints_file``, the list is re-read every ``reload_seconds`` meanwhile.
    """
    deadline = time.monotonic() + timeout
    drainers: list[QueueDrainer] = []
    try:
        for index, path in process_dirs(data_dir):
            drainers.append(QueueDrainer(path, index, node_id, endpoints, queue_bytes,
                                         curve_keys))
        next_check = time.monotonic() + reload_seconds
        while not all(d.is_empty() for d in drainers):
            now = time.monotonic()
            if now >= deadline:
                return False
            if any(d.forwarder.error is not None for d in drainers):
                return False
            if endpoints_file is not None and now >= next_check:
                next_check = now + reload_seconds
                changed = endpoints_file.check()
                if changed is not None:
                    for drainer in drainers:
                        drainer.forwarder.set_endpoints(changed)
            time.sleep(0.02)
        return True
    finally:
        for drainer in drainers:
            drainer.close()


def main(argv: Sequence[str]) -> int:
    settings = parse_settings(DrainSettings, argv)
    setup_logging("drain", settings.log_level)
    try:
        endpoints, watched = settings.resolved_endpoints()
    except EndpointsError as exc:
        print(f"iotpipe drain: error: {exc}", file=sys.stderr)
        return 2
    if not settings.data_dir.is_dir():
        print(f"iotpipe drain: error: {settings.data_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        keys = load_keys(settings.curve_keys_dir, "ingest") if settings.curve_keys_dir else None
    except CurveKeyError as exc:
        print(f"iotpipe drain: error: --curve-keys-dir: {exc}", file=sys.stderr)
        return 2
    try:
        empty = drain_queues(settings.data_dir, settings.node_id, endpoints,
                             settings.timeout, settings.queue_bytes, watched,
                             settings.endpoints_reload_seconds, keys)
    except QueueError as exc:
        print(f"iotpipe drain: error: {exc}", file=sys.stderr)
        return 2
    log.info("drain done", extra={"fields": {"empty": empty}})
    return 0 if empty else 1
