"""The node identity an ingest queue is forwarded under.

The middle tier deduplicates by (node identity, queue seq). A queue's seqs restart at 1
when its directory is recreated (a new volume after a drained one was deleted, a wiped
disk), so a bare pod name would make the middle tier take the new queue's records for
duplicates of the old one's and drop them. Each queue directory therefore carries a random
incarnation, written once and durably before its first record is forwarded, and the
identity is ``<pod>-p<i>~<incarnation>``: the same pod, the same volume, the same identity
(so a restart or a drain Job is deduplicated), a new volume, a new identity.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from iotpipe.durable import write_atomic

__all__ = ["INCARNATION_FILE", "queue_node_id"]

INCARNATION_FILE = "node.incarnation"


def queue_node_id(queue_dir: Path, base: str) -> str:
    """``base~<incarnation>`` for the queue in ``queue_dir``, creating the incarnation once.

    Call it while holding the queue open (its lock makes this process the only writer).
    """
    path = queue_dir / INCARNATION_FILE
    try:
        incarnation = path.read_text().strip()
    except FileNotFoundError:
        incarnation = ""
    if len(incarnation) != 16 or not all(c in "0123456789abcdef" for c in incarnation):
        incarnation = secrets.token_hex(8)
        write_atomic(path, (incarnation + "\n").encode())
    return f"{base}~{incarnation}"
