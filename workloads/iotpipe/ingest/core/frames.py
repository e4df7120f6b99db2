"""Device frames: validate what a device sends, encode what the server answers.

Pure functions and plain classes (no sockets, no clock reads: the caller passes the time).
The exact format is specified for firmware authors in docs/protocols.md, "Device protocol".

Device -> server: a JSON object ``{"id", "ts"?, "data", "device"?}`` or a JSON array of them.
Server -> device: ``{"type": "ack", "ids": [...]}``, ``{"type": "error", "reason", "ids",
"detail"?, "retry_after_ms"?}``, ``{"type": "busy", "ids", "retry_after_ms"}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from iotpipe.wire import encode_reading

__all__ = [
    "FrameLimits",
    "MessageError",
    "ParsedFrame",
    "encode_ack_frame",
    "encode_busy_frame",
    "encode_error_frame",
    "parse_frame",
    "parse_frame_python",
    "parse_ts",
]

# Reasons a single message (or a whole frame) is refused (docs/protocols.md, "Device protocol").
BAD_JSON = "bad_json"
NOT_AN_OBJECT = "not_an_object"
EMPTY_BATCH = "empty_batch"
BATCH_TOO_LARGE = "batch_too_large"
MISSING_ID = "missing_id"
BAD_ID = "bad_id"
BAD_TS = "bad_ts"
MISSING_DATA = "missing_data"
BAD_DATA = "bad_data"
FORBIDDEN_DEVICE = "forbidden_device"
MISSING_DEVICE = "missing_device"
RATE_LIMITED = "rate_limited"
INTERNAL = "internal"

# Timestamps outside [2000-01-01, 2100-01-01) are almost always unit mistakes (ms vs s).
_TS_MIN_NS = 946_684_800 * 10**9
_TS_MAX_NS = 4_102_444_800 * 10**9
_INT64_MAX = 2**63 - 1
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


@dataclass(frozen=True)
class FrameLimits:
    """Validation limits; the server fills them from its settings."""

    max_batch: int = 1000
    max_id_len: int = 64
    max_data_keys: int = 64
    max_key_len: int = 64
    max_str_len: int = 256


@dataclass(frozen=True)
class MessageError:
    """One refused message: its id as the device sent it (None if unknown) and why."""

    msg_id: str | int | None
    reason: str
    detail: str


class ParsedFrame:
    """The outcome of one device frame: good messages (as queue payloads) and refusals."""

    # A plain class: built for every frame, where a dataclass's default factories cost.
    __slots__ = ("errors", "ids", "readings")

    def __init__(self, ids: list[str | int] | None = None, readings: list[bytes] | None = None,
                 errors: list[MessageError] | None = None) -> None:
        self.ids = [] if ids is None else ids
        self.readings = [] if readings is None else readings
        self.errors = [] if errors is None else errors

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParsedFrame) and (self.ids, self.readings, self.errors) == (
            other.ids, other.readings, other.errors)

    def __repr__(self) -> str:
        return f"ParsedFrame(ids={self.ids!r}, readings={self.readings!r}, errors={self.errors!r})"


def parse_ts(value: object) -> int:
    """Nanoseconds since the epoch from a number (seconds) or an RFC 3339 string."""
    if isinstance(value, bool):
        raise ValueError("'ts' must be a number of seconds or an RFC 3339 string")
    if isinstance(value, int):
        ns = value * 10**9
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("'ts' must be finite")
        # A double holds ~0.2 us at today's epoch: keep microseconds, which round-trip.
        whole = math.floor(value)
        ns = whole * 10**9 + round((value - whole) * 1e6) * 1000
    elif isinstance(value, str):
        match = _RFC3339.fullmatch(value)
        if match is None:
            raise ValueError("'ts' string must be RFC 3339 with a time zone, e.g. "
                             "2026-11-26T15:00:00.123Z")
        year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
        try:
            # Leap second 60 is folded into 59.999...: nothing downstream can store it.
            base = datetime(year, month, day, hour, minute, min(second, 59), tzinfo=UTC)
        except ValueError as exc:
            raise ValueError(f"'ts' is not a valid date/time ({exc})") from None
        ns = int(base.timestamp()) * 10**9
        if match.group(7):
            ns += int(match.group(7).ljust(9, "0"))
        if match.group(9):
            offset = int(match.group(10)) * 3600 + int(match.group(11)) * 60
            ns -= (offset if match.group(9) == "+" else -offset) * 10**9
    else:
        raise ValueError("'ts' must be a number of seconds or an RFC 3339 string")
    if not _TS_MIN_NS <= ns < _TS_MAX_NS:
        raise ValueError("'ts' is outside 2000..2100 (seconds since the epoch expected)")
    return ns


_SCALAR_TYPES = frozenset({int, float, bool, type(None)})  # orjson never yields NaN/inf


def _check_data(data: object, limits: FrameLimits) -> str | None:
    """None if ``data`` is a valid readings map, else what is wrong with it."""
    if type(data) is not dict:
        return "'data' must be an object"
    if not data:
        return "'data' must not be empty"
    if len(data) > limits.max_data_keys:
        return f"'data' has {len(data)} keys (max {limits.max_data_keys})"
    max_key_len, max_str_len = limits.max_key_len, limits.max_str_len
    scalars = _SCALAR_TYPES
    # type() identity, not isinstance: JSON decoding only yields exact builtin types, and
    # this loop runs for every field of every message.
    for key, value in data.items():
        if not 0 < len(key) <= max_key_len:
            return f"'data' keys must be 1..{max_key_len} characters"
        kind = type(value)
        if kind is str:
            if len(value) > max_str_len:
                return f"'data.{key}' is longer than {max_str_len} characters"
        elif kind not in scalars:
            return f"'data.{key}' must be a number, string, boolean or null"
    return None


def _check_id(msg_id: object, limits: FrameLimits) -> str | None:
    if isinstance(msg_id, bool):
        return "'id' must be a string or an integer"
    if isinstance(msg_id, int):
        if not 0 <= msg_id <= _INT64_MAX:
            return "integer 'id' must be in 0..2^63-1"
        return None
    if isinstance(msg_id, str):
        if not 0 < len(msg_id) <= limits.max_id_len:
            return f"'id' must be 1..{limits.max_id_len} characters"
        return None
    return "'id' must be a string or an integer"


def parse_frame(
    frame: str | bytes,
    device_id: str | None,
    received_ns: int,
    limits: FrameLimits = FrameLimits(),
) -> ParsedFrame:
    """Validate one device frame; every good message becomes an encoded ``Reading``.

    ``device_id`` is the authenticated device. ``None`` (insecure mode without
    ``?device=``) means each message must name its device in a ``"device"`` field.

    A frame whose messages are all valid in the common forms is accepted by the C
    accelerator (``_frames.c``) when it is built; any other frame, and every refusal, is
    judged here in Python.
    """
    return _parse(frame, device_id, received_ns, limits, ACCEPT_FRAME)


def parse_frame_python(
    frame: str | bytes,
    device_id: str | None,
    received_ns: int,
    limits: FrameLimits = FrameLimits(),
) -> ParsedFrame:
    """``parse_frame`` without the C accelerator (the tests compare the two)."""
    return _parse(frame, device_id, received_ns, limits, None)


def _parse(frame: str | bytes, device_id: str | None, received_ns: int, limits: FrameLimits,
           accept: AcceptFrame | None) -> ParsedFrame:
    try:
        doc = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        return ParsedFrame(errors=[MessageError(None, BAD_JSON, f"not valid JSON: {exc}")])
    if accept is not None:
        accepted = accept(doc, device_id, received_ns, limits.max_batch, limits.max_id_len,
                          limits.max_data_keys, limits.max_key_len, limits.max_str_len,
                          orjson.dumps)
        if accepted is not None:
            return ParsedFrame(*accepted)
    out = ParsedFrame()
    if isinstance(doc, list):
        if not doc:
            out.errors.append(MessageError(None, EMPTY_BATCH, "a batch must not be empty"))
            return out
        if len(doc) > limits.max_batch:
            out.errors.append(MessageError(
                None, BATCH_TOO_LARGE, f"{len(doc)} messages in one batch (max {limits.max_batch})"
            ))
            return out
        messages = doc
    else:
        messages = (doc,)
    ids, readings, errors = out.ids, out.readings, out.errors
    max_id_len = limits.max_id_len
    dumps, encode = orjson.dumps, encode_reading
    for msg in messages:
        if type(msg) is not dict:
            errors.append(MessageError(None, NOT_AN_OBJECT, "a message must be a JSON object"))
            continue
        msg_id = msg.get("id")
        if msg_id is None:
            errors.append(MessageError(None, MISSING_ID, "'id' is required"))
            continue
        kind = type(msg_id)
        if kind is str:
            problem = None if 0 < len(msg_id) <= max_id_len else _check_id(msg_id, limits)
        elif kind is int:
            problem = None if 0 <= msg_id <= _INT64_MAX else _check_id(msg_id, limits)
        else:
            problem = _check_id(msg_id, limits)
        if problem:
            # Echo only ids that are safe to echo: a 10 MB id string is not.
            echo = msg_id if isinstance(msg_id, (str, int)) and not isinstance(msg_id, bool) \
                and len(str(msg_id)) <= 4 * limits.max_id_len else None
            errors.append(MessageError(echo, BAD_ID, problem))
            continue
        claimed = msg.get("device")
        if device_id is None:
            if not isinstance(claimed, str) or not claimed:
                errors.append(MessageError(msg_id, MISSING_DEVICE,
                                           "no device identity: pass ?device= or a 'device' field"))
                continue
            owner = claimed
        else:
            if claimed is not None and claimed != device_id:
                errors.append(MessageError(msg_id, FORBIDDEN_DEVICE,
                                           "'device' differs from the authenticated device"))
                continue
            owner = device_id
        ts = msg.get("ts")
        if ts is None:
            ts_ns = received_ns
        else:
            try:
                ts_ns = parse_ts(ts)
            except ValueError as exc:
                errors.append(MessageError(msg_id, BAD_TS, str(exc)))
                continue
        data = msg.get("data")
        if data is None:
            errors.append(MessageError(msg_id, MISSING_DATA, "'data' is required"))
            continue
        problem = _check_data(data, limits)
        if problem:
            errors.append(MessageError(msg_id, BAD_DATA, problem))
            continue
        ids.append(msg_id)
        readings.append(encode(owner, msg_id if kind is str else str(msg_id), ts_ns, dumps(data),
                               received_ns))
    return out


# (doc, device_id, received_ns, max_batch, max_id_len, max_data_keys, max_key_len,
#  max_str_len, dumps) -> (ids, readings) when every message of the decoded frame is valid
# in the common forms, else None (then the frame is judged in Python).
AcceptFrame = Callable[[object, str | None, int, int, int, int, int, int,
                        Callable[[object], bytes]],
                       tuple[list[str | int], list[bytes]] | None]

try:
    from iotpipe.ingest.core._frames import accept_frame as _accept_frame

    ACCEPT_FRAME: AcceptFrame | None = _accept_frame
except ImportError:  # not built (no compiler at install): every frame judged in Python
    ACCEPT_FRAME = None


def encode_ack_frame(ids: list[str | int]) -> bytes:
    return orjson.dumps({"type": "ack", "ids": ids})


def encode_error_frame(
    reason: str, ids: list[str | int | None], detail: str = "", retry_after_ms: int | None = None
) -> bytes:
    body: dict[str, object] = {"type": "error", "reason": reason, "ids": ids}
    if detail:
        body["detail"] = detail
    if retry_after_ms is not None:
        body["retry_after_ms"] = retry_after_ms
    return orjson.dumps(body)


def encode_busy_frame(ids: list[str | int], retry_after_ms: int) -> bytes:
    return orjson.dumps({"type": "busy", "ids": ids, "retry_after_ms": retry_after_ms})
