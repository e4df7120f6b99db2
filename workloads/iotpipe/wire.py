"""Wire formats between tiers: pure encode/decode functions, no sockets.

Everything between tiers is msgpack, framed as ZeroMQ multipart messages whose first frame
names the message kind and version. Readings travel as opaque bytes from the ingest queue
to the storage sinks: the middle tier never decodes them, it only wraps them.

Reading (ingest queue payload)
    msgpack ``[device_id: str, msg_id: str, ts_ns: int, data_json: bytes, received_ns: int]``
    ``data_json`` is the device's ``data`` object as compact JSON, so the relay can splice
    it into client frames without re-encoding.

Ingest -> middle (DEALER -> ROUTER)
    request ``[KIND_BATCH_V2, msgpack {"node", "first", "n"}, msgpack [reading_1, ...,
    reading_n]]``: the readings in ONE frame (a ZeroMQ frame costs ~2 us to send and
    receive from Python, one msgpack array of bins ~0.1 us per reading). Middles also
    accept v1, ``[KIND_BATCH, header, reading_1, ..., reading_n]`` (one frame per
    reading, as ingest sent before), so middles are upgraded first, then ingest.
    The readings carry the ingest node's queue seqs ``first .. first+n-1``.
    replies ``[KIND_ACK, msgpack {"node", "last"}]`` once durable in the middle log, or
    ``[KIND_BUSY, msgpack {"node", "first", "retry_ms", "reason"}]``.

Middle log record
    msgpack ``[node: str, node_seq: int, reading: bytes]``.

Middle -> relay (PUB -> SUB)
    v2 (default), one message per commit group: ``[b"", KIND_LIVE_V2, msgpack {"m":
    middle_id, "first": first_log_seq, "n": count}, msgpack [reading_1, ..., reading_n]]``;
    the readings carry middle log seqs ``first .. first+n-1``. The empty topic cannot be a
    device id, and an old relay refuses the 4 frames as malformed (counts them, routes
    nothing) rather than misreading them.
    v1, one message per record: ``[device_id (utf-8, the topic), msgpack {"m": middle_id,
    "s": middle_log_seq}, reading]``. ``decode_live_events`` reads both.

Storage <-> middle feed (DEALER -> ROUTER)
    request ``[KIND_FEED, msgpack {"group", "consumer", "credit", "acks": [[first, last], ...],
    "v"}]``; ``v``, the newest delivery format the consumer reads, is 1 when absent.
    delivery ``[KIND_RECORDS_V2, msgpack {"group", "middle", "first", "n"}, msgpack [record_1,
    ..., record_n]]`` to a consumer that reads v2 (the records in one frame, as in a v2
    batch), else v1 ``[KIND_RECORDS, header, record_1, ..., record_n]``; the records carry
    middle log seqs ``first .. first+n-1``. Old and new consumers and middles mix freely.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from itertools import count, repeat
from typing import NamedTuple

import msgpack

__all__ = [
    "BATCH_KINDS",
    "KIND_ACK",
    "KIND_BATCH",
    "KIND_BATCH_V2",
    "KIND_BUSY",
    "KIND_FEED",
    "KIND_LIVE_V2",
    "KIND_RECORDS",
    "KIND_RECORDS_V2",
    "LIVE_GROUP_RECORDS_MAX",
    "RECORDS_VERSION",
    "Ack",
    "Batch",
    "Busy",
    "FeedRequest",
    "LiveEvent",
    "LiveGroup",
    "LogRecord",
    "PackBins",
    "Reading",
    "Records",
    "WireError",
    "decode_ack",
    "decode_batch",
    "decode_busy",
    "decode_feed_request",
    "decode_live",
    "decode_live_events",
    "decode_live_group",
    "decode_log_record",
    "decode_reading",
    "decode_records",
    "encode_ack",
    "encode_batch",
    "encode_batch_v1",
    "encode_busy",
    "encode_feed_request",
    "encode_live",
    "encode_live_group",
    "encode_log_record",
    "encode_log_records",
    "encode_reading",
    "encode_records",
    "encode_records_packed",
    "live_group_events",
    "live_meta",
    "live_meta_prefix",
    "live_metas",
    "message_kind",
    "reading_topic",
]

KIND_BATCH = b"iotpipe.batch.v1"
KIND_BATCH_V2 = b"iotpipe.batch.v2"
BATCH_KINDS = (KIND_BATCH_V2, KIND_BATCH)
KIND_ACK = b"iotpipe.ack.v1"
KIND_BUSY = b"iotpipe.busy.v1"
KIND_FEED = b"iotpipe.feed.v1"
KIND_RECORDS = b"iotpipe.records.v1"
KIND_RECORDS_V2 = b"iotpipe.records.v2"
KIND_LIVE_V2 = b"iotpipe.live.v2"
# The most readings a middle puts in one v2 live message: a subscriber sizes its receive
# high-water mark (ZeroMQ counts messages) by it, so its memory stays bounded in records.
LIVE_GROUP_RECORDS_MAX = 256
RECORDS_VERSION = 2  # the newest feed delivery format (what this code's consumers read)

_packb = msgpack.Packer(use_bin_type=True).pack
# Packs a sequence of bytes as a msgpack array of bins, byte for byte as ``_packb`` packs a
# list of them (the middle passes its C one, which skips msgpack's per-item type dispatch
# and reads its runs of payloads without an object per payload).
PackBins = Callable[[Sequence[bytes]], bytes]


def _pack_list(items: Sequence[bytes]) -> bytes:
    return _packb(items if isinstance(items, list) else list(items))


class WireError(ValueError):
    """A frame that does not follow the wire format; the message names what is wrong."""


def _unpack(data: bytes, what: str) -> object:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"{what}: not valid msgpack ({exc})") from None


def _require_dict(obj: object, what: str, fields: dict[str, type]) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise WireError(f"{what}: expected a map, got {type(obj).__name__}")
    for name, typ in fields.items():
        value = obj.get(name)
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise WireError(f"{what}: field {name!r} must be {typ.__name__}")
    return obj


def _bin_array(frame: bytes, what: str) -> list[bytes]:
    """A frame holding one msgpack array of bin (a v2 batch's readings, a v2 delivery)."""
    body = _unpack(bytes(frame), what)
    # set(map(type, ...)) checks every item at C speed (no Python call per item)
    if not isinstance(body, list) or not set(map(type, body)) <= {bytes}:
        raise WireError(f"{what} must be an array of bin")
    return body


def message_kind(frames: Sequence[bytes]) -> bytes:
    """The kind frame of a multipart message (b"" when there is none)."""
    return bytes(frames[0]) if frames else b""


# -- readings ----------------------------------------------------------------------------


class Reading(NamedTuple):
    device_id: str
    msg_id: str
    ts_ns: int
    data_json: bytes
    received_ns: int


def encode_reading(
    device_id: str, msg_id: str, ts_ns: int, data_json: bytes, received_ns: int
) -> bytes:
    return _packb([device_id, msg_id, ts_ns, data_json, received_ns])


def decode_reading(data: bytes) -> Reading:
    obj = _unpack(data, "reading")
    if not isinstance(obj, list) or len(obj) != 5:
        raise WireError("reading: expected an array of 5 items")
    device_id, msg_id, ts_ns, data_json, received_ns = obj
    if not (
        isinstance(device_id, str)
        and isinstance(msg_id, str)
        and isinstance(ts_ns, int)
        and isinstance(data_json, bytes)
        and isinstance(received_ns, int)
    ):
        raise WireError("reading: wrong item types")
    return Reading(device_id, msg_id, ts_ns, data_json, received_ns)


# -- ingest -> middle --------------------------------------------------------------------


class Batch(NamedTuple):
    node: str
    first: int
    # A list from ``decode_batch``; the middle's C decoder gives a run of spans over the
    # batch's body (iotpipe.queue.framing.PayloadRun), a sequence of bytes all the same.
    readings: Sequence[bytes]

    @property
    def last(self) -> int:
        return self.first + len(self.readings) - 1


class Ack(NamedTuple):
    node: str
    last: int


class Busy(NamedTuple):
    node: str
    first: int
    retry_ms: int
    reason: str


def encode_batch(node: str, first: int, readings: Sequence[bytes]) -> list[bytes]:
    return [KIND_BATCH_V2, _packb({"node": node, "first": first, "n": len(readings)}),
            _packb(readings if isinstance(readings, list) else list(readings))]


def encode_batch_v1(node: str, first: int, readings: Sequence[bytes]) -> list[bytes]:
    """The previous format (one frame per reading), still accepted by ``decode_batch``."""
    return [KIND_BATCH, _packb({"node": node, "first": first, "n": len(readings)}), *readings]


def decode_batch(frames: Sequence[bytes]) -> Batch:
    kind = bytes(frames[0]) if frames else b""
    if len(frames) < 2 or kind not in BATCH_KINDS:
        raise WireError("batch: expected kind frame and header")
    header = _require_dict(
        _unpack(bytes(frames[1]), "batch header"), "batch header",
        {"node": str, "first": int, "n": int},
    )
    if kind == KIND_BATCH_V2:
        if len(frames) != 3:
            raise WireError(f"batch: v2 has 3 frames, got {len(frames)}")
        readings = _bin_array(frames[2], "batch: v2 readings")
    else:
        readings = [bytes(f) for f in frames[2:]]
    if header["n"] != len(readings) or len(readings) == 0:
        raise WireError(f"batch: header says {header['n']} readings, got {len(readings)}")
    first = header["first"]
    assert isinstance(first, int)
    if first < 1:
        raise WireError("batch: 'first' must be >= 1")
    return Batch(str(header["node"]), first, readings)


@lru_cache(maxsize=1024)  # a middle hears from a handful of ingest nodes
def _ack_prefix(node: str) -> bytes:
    """An ack's body up to the value of "last" (packed, 0 is the one byte it ends with)."""
    return _packb({"node": node, "last": 0})[:-1]


def encode_ack(node: str, last: int) -> list[bytes]:
    # The same bytes as packing {"node": node, "last": last}, for a third of the cost: the
    # middle sends one per batch.
    return [KIND_ACK, _ack_prefix(node) + _packb(last)]


def decode_ack(frames: Sequence[bytes]) -> Ack:
    if len(frames) != 2 or bytes(frames[0]) != KIND_ACK:
        raise WireError("ack: expected kind frame and body")
    body = _require_dict(_unpack(bytes(frames[1]), "ack"), "ack", {"node": str, "last": int})
    return Ack(str(body["node"]), int(body["last"]))  # type: ignore[call-overload]


def encode_busy(node: str, first: int, retry_ms: int, reason: str) -> list[bytes]:
    return [KIND_BUSY, _packb({"node": node, "first": first, "retry_ms": retry_ms,
                              "reason": reason})]


def decode_busy(frames: Sequence[bytes]) -> Busy:
    if len(frames) != 2 or bytes(frames[0]) != KIND_BUSY:
        raise WireError("busy: expected kind frame and body")
    body = _require_dict(
        _unpack(bytes(frames[1]), "busy"), "busy",
        {"node": str, "first": int, "retry_ms": int, "reason": str},
    )
    return Busy(str(body["node"]), int(body["first"]), int(body["retry_ms"]),  # type: ignore[call-overload]
                str(body["reason"]))


# -- middle log --------------------------------------------------------------------------


class LogRecord(NamedTuple):
    node: str
    node_seq: int
    reading: bytes


def encode_log_record(node: str, node_seq: int, reading: bytes) -> bytes:
    return _packb([node, node_seq, reading])


def encode_log_records(node: str, first: int, readings: Iterable[bytes]) -> list[bytes]:
    """``encode_log_record`` for consecutive node seqs from ``first``, one per reading.

    The same bytes (msgpack packs a tuple as an array); map/zip keep the loop in C.
    """
    return list(map(_packb, zip(repeat(node), count(first), readings)))


def decode_log_record(data: bytes) -> LogRecord:
    obj = _unpack(data, "log record")
    if (
        not isinstance(obj, list)
        or len(obj) != 3
        or not isinstance(obj[0], str)
        or not isinstance(obj[1], int)
        or not isinstance(obj[2], bytes)
    ):
        raise WireError("log record: expected [node: str, node_seq: int, reading: bytes]")
    return LogRecord(obj[0], obj[1], obj[2])


# -- middle -> relay ---------------------------------------------------------------------


class LiveEvent(NamedTuple):
    device_id: str
    middle_id: str
    seq: int
    reading: bytes


def live_meta_prefix(middle_id: str) -> bytes:
    """The live meta frame up to the seq value: the meta of seq ``s`` is this + packb(s).

    A publisher sends one event per record; building the map once per middle instead of
    once per event keeps the per-event work to packing one integer.
    """
    return b"\x82\xa1m" + _packb(middle_id) + b"\xa1s"  # {"m": middle_id, "s": ...}


def live_meta(prefix: bytes, seq: int) -> bytes:
    return prefix + _packb(seq)


def live_metas(prefix: bytes, first: int) -> Iterator[bytes]:
    """``live_meta`` of seqs ``first``, ``first + 1``, ... (map keeps the loop in C)."""
    return map(prefix.__add__, map(_packb, count(first)))


def encode_live(device_id: str, middle_id: str, seq: int, reading: bytes) -> list[bytes]:
    return [device_id.encode(), live_meta(live_meta_prefix(middle_id), seq), reading]


def reading_topic(reading: bytes) -> bytes | None:
    """The device id of an encoded reading as raw UTF-8 bytes (the PUB topic), cheaply.

    A reading is a msgpack array of 5 whose first item is the device id string, so it
    starts with 0x95 and a str header; the id is sliced out without decoding the rest.
    None when the bytes do not start like a reading.
    """
    if len(reading) < 2 or reading[0] != 0x95:
        return None
    head = reading[1]
    if 0xA0 <= head <= 0xBF:  # fixstr
        start, length = 2, head & 0x1F
    elif head == 0xD9 and len(reading) >= 3:  # str 8
        start, length = 3, reading[2]
    elif head == 0xDA and len(reading) >= 4:  # str 16
        start, length = 4, int.from_bytes(reading[2:4], "big")
    elif head == 0xDB and len(reading) >= 6:  # str 32
        start, length = 6, int.from_bytes(reading[2:6], "big")
    else:
        return None
    end = start + length
    return reading[start:end] if end <= len(reading) else None


def decode_live(frames: Sequence[bytes]) -> LiveEvent:
    if len(frames) != 3:
        raise WireError("live event: expected 3 frames")
    meta = _require_dict(_unpack(bytes(frames[1]), "live meta"), "live meta", {"m": str, "s": int})
    try:
        device_id = bytes(frames[0]).decode()
    except UnicodeDecodeError:
        raise WireError("live event: topic is not utf-8") from None
    return LiveEvent(device_id, str(meta["m"]), int(meta["s"]), bytes(frames[2]))  # type: ignore[call-overload]


class LiveGroup(NamedTuple):
    middle_id: str
    first: int
    readings: list[bytes]

    @property
    def last(self) -> int:
        return self.first + len(self.readings) - 1


def encode_live_group(middle_id: str, first: int, readings: Sequence[bytes],
                      pack_bins: PackBins | None = None) -> list[bytes]:
    """One v2 live message: the readings with middle log seqs ``first .. first+n-1``."""
    return [b"", KIND_LIVE_V2, _packb({"m": middle_id, "first": first, "n": len(readings)}),
            (pack_bins or _pack_list)(readings)]


def decode_live_group(frames: Sequence[bytes]) -> LiveGroup:
    if len(frames) != 4 or bytes(frames[0]) != b"" or bytes(frames[1]) != KIND_LIVE_V2:
        raise WireError("live group: expected [b'', kind, header, readings]")
    header = _require_dict(_unpack(bytes(frames[2]), "live group header"),
                           "live group header", {"m": str, "first": int, "n": int})
    readings = _bin_array(frames[3], "live group readings")
    if header["n"] != len(readings) or not readings:
        raise WireError(f"live group: header says {header['n']} readings, got {len(readings)}")
    first = header["first"]
    assert isinstance(first, int)
    if first < 1:
        raise WireError("live group: 'first' must be >= 1")
    return LiveGroup(str(header["m"]), first, readings)


def live_group_events(group: LiveGroup) -> list[LiveEvent]:
    """The group as the per-record events a v1 middle would have sent.

    A reading without a readable device id keeps its seq (the group is contiguous) with
    device id "", which no reading has: the relay counts it as a bad event, not a gap.
    """
    readings = group.readings
    topics = list(map(reading_topic, readings))
    try:  # map keeps the common case's loop in C
        device_ids = list(map(bytes.decode, topics))  # type: ignore[arg-type]
    except (TypeError, UnicodeDecodeError):  # a None topic, or one that is not UTF-8
        device_ids = list(map(_device_id_or_empty, topics))
    return list(map(LiveEvent, device_ids, repeat(group.middle_id), count(group.first),
                    readings))


def _device_id_or_empty(topic: bytes | None) -> str:
    if topic is None:
        return ""
    try:
        return topic.decode()
    except UnicodeDecodeError:
        return ""


def decode_live_events(frames: Sequence[bytes]) -> list[LiveEvent]:
    """The events of a live message of either version (v2 group or v1 single record)."""
    if len(frames) == 4 and bytes(frames[0]) == b"":
        return live_group_events(decode_live_group(frames))
    return [decode_live(frames)]


# -- storage <-> middle feed -------------------------------------------------------------


class FeedRequest(NamedTuple):
    group: str
    consumer: str
    credit: int
    acks: list[tuple[int, int]]
    records_version: int = RECORDS_VERSION  # the newest delivery format the consumer reads


class Records(NamedTuple):
    group: str
    middle: str
    first: int
    records: list[bytes]

    @property
    def last(self) -> int:
        return self.first + len(self.records) - 1


def encode_feed_request(
    group: str, consumer: str, credit: int, acks: Sequence[tuple[int, int]] = (),
    records_version: int = RECORDS_VERSION,
) -> list[bytes]:
    body = {"group": group, "consumer": consumer, "credit": credit,
            "acks": [[a, b] for a, b in acks], "v": records_version}
    return [KIND_FEED, _packb(body)]


def decode_feed_request(frames: Sequence[bytes]) -> FeedRequest:
    if len(frames) != 2 or bytes(frames[0]) != KIND_FEED:
        raise WireError("feed request: expected kind frame and body")
    body = _require_dict(
        _unpack(bytes(frames[1]), "feed request"), "feed request",
        {"group": str, "consumer": str, "credit": int, "acks": list},
    )
    acks: list[tuple[int, int]] = []
    for item in body["acks"]:  # type: ignore[attr-defined]
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            or item[0] > item[1]
            or item[0] < 1
        ):
            raise WireError("feed request: each ack must be [first, last] with 1 <= first <= last")
        acks.append((item[0], item[1]))
    credit = int(body["credit"])  # type: ignore[call-overload]
    if credit < 0:
        raise WireError("feed request: credit must be >= 0")
    version = body.get("v", 1)  # a consumer from before v2 sends none
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise WireError("feed request: 'v' must be an integer >= 1")
    return FeedRequest(str(body["group"]), str(body["consumer"]), credit, acks, version)


def encode_records(group: str, middle: str, first: int, records: Sequence[bytes],
                   version: int = 1) -> list[bytes]:
    """A delivery; ``version`` 2 (one frame for all records) once the consumer reads it."""
    if version >= 2:
        return encode_records_packed(group, middle, first, len(records), _pack_list(records))
    header = _packb({"group": group, "middle": middle, "first": first, "n": len(records)})
    return [KIND_RECORDS, header, *records]


def encode_records_packed(group: str, middle: str, first: int, count: int, body: bytes
                          ) -> list[bytes]:
    """A v2 delivery of ``count`` records whose body (a msgpack array of bins) is packed
    (the middle packs it from its runs of records with ``hot.pack_runs``)."""
    header = _packb({"group": group, "middle": middle, "first": first, "n": count})
    return [KIND_RECORDS_V2, header, body]


def decode_records(frames: Sequence[bytes]) -> Records:
    kind = bytes(frames[0]) if frames else b""
    if len(frames) < 2 or kind not in (KIND_RECORDS, KIND_RECORDS_V2):
        raise WireError("records: expected kind frame and header")
    header = _require_dict(
        _unpack(bytes(frames[1]), "records header"), "records header",
        {"group": str, "middle": str, "first": int, "n": int},
    )
    if kind == KIND_RECORDS_V2:
        if len(frames) != 3:
            raise WireError(f"records: v2 has 3 frames, got {len(frames)}")
        records = _bin_array(frames[2], "records: v2 body")
    else:
        records = [bytes(f) for f in frames[2:]]
    if header["n"] != len(records):
        raise WireError(f"records: header says {header['n']} records, got {len(records)}")
    return Records(str(header["group"]), str(header["middle"]), int(header["first"]),  # type: ignore[call-overload]
                   records)
