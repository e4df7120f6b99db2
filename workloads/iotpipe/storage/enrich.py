"""From middle log records to stored readings: decode, then denormalise with the registry.

A device that the registry does not know is stored with class and location ``unknown``
and no labels, never dropped: the reading is still true, only its context is missing, and
a later registry entry makes new readings of that device complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from iotpipe import wire
from iotpipe.registry import UNKNOWN, Registry

__all__ = ["Rejected", "StoredReading", "enrich_records"]


class StoredReading(NamedTuple):
    """One row as every sink stores it (the denormalised record)."""

    device_id: str
    msg_id: str
    ts_ns: int
    received_ns: int
    node: str
    node_seq: int
    data: str  # the device's data object as JSON text, exactly as ingest stored it
    device_class: str
    location: str
    labels: dict[str, str]


class Rejected(NamedTuple):
    """A record that could not be decoded; ``seq`` is its middle log sequence number."""

    seq: int
    reason: str


def enrich_records(
    first_seq: int, records: Sequence[bytes], registry: Registry
) -> tuple[list[StoredReading], list[Rejected]]:
    """Decode and enrich the records of one delivery (log seqs ``first_seq`` onwards).

    Malformed records are returned as ``Rejected`` instead of raising, so one bad record
    cannot stop the feed; the caller counts and logs them.
    """
    stored: list[StoredReading] = []
    rejected: list[Rejected] = []
    lookup = registry.lookup
    for offset, raw in enumerate(records):
        try:
            node, node_seq, reading_bytes = wire.decode_log_record(raw)
            reading = wire.decode_reading(reading_bytes)
            data = reading.data_json.decode("utf-8")
        except wire.WireError as exc:
            rejected.append(Rejected(first_seq + offset, str(exc)))
            continue
        except UnicodeDecodeError:
            rejected.append(Rejected(first_seq + offset, "reading: data is not UTF-8 JSON"))
            continue
        info = lookup(reading.device_id) or UNKNOWN
        stored.append(StoredReading(
            reading.device_id, reading.msg_id, reading.ts_ns, reading.received_ns,
            node, node_seq, data, info.device_class, info.location, info.labels,
        ))
    return stored, rejected
