"""What a relay client asks for: its subscribe/unsubscribe frames and the filter they build.

Part of the relay's sans-I/O core (re-exported by :mod:`iotpipe.relay.core`);
docs/protocols.md, "Client-app protocol", describes the same rules to clients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

__all__ = ["ALL_FIELD", "ALL_PREFIX", "FILTER_FIELDS", "ClientRequest", "Filters",
           "ProtocolError", "Subscription", "error_frame", "parse_client_frame"]

FILTER_FIELDS = ("devices", "prefixes", "classes", "locations")

# {"op": "subscribe", "all": true} follows every device. It is kept as the empty prefix,
# which every id starts with, so routing and matching need no special case; the empty
# string itself stays refused in "prefixes" (an explicit "all" is the one way to ask).
ALL_FIELD = "all"
ALL_PREFIX = ""

# Filter sets by field name ("devices", "prefixes", "classes", "locations").
Filters = dict[str, set[str]]


class ProtocolError(ValueError):
    """A client frame the relay cannot accept; ``reason`` is the machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def error_frame(reason: str, detail: str, op: str | None = None) -> bytes:
    body: dict[str, object] = {"event": "error", "reason": reason, "detail": detail}
    if op is not None:
        body["op"] = op
    return orjson.dumps(body)


# -- client frames -----------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRequest:
    """A parsed ``subscribe`` / ``unsubscribe`` frame."""

    op: str
    devices: frozenset[str] = frozenset()
    prefixes: frozenset[str] = frozenset()
    classes: frozenset[str] = frozenset()
    locations: frozenset[str] = frozenset()


def parse_client_frame(text: str | bytes, max_items: int = 1000,
                       max_item_len: int = 256) -> ClientRequest:
    """Parse one client text frame; raise :class:`ProtocolError` naming what is wrong."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("bad_json", f"frame is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "frame must be a JSON object")
    op = obj.get("op")
    if op not in ("subscribe", "unsubscribe"):
        raise ProtocolError("unknown_op", f"'op' must be 'subscribe' or 'unsubscribe', got {op!r}")
    unknown = sorted(set(obj) - {"op", ALL_FIELD, *FILTER_FIELDS})
    if unknown:
        raise ProtocolError("bad_field", f"unknown field(s) {', '.join(unknown)}")
    every = obj.get(ALL_FIELD, False)
    if every is not False and every is not True:
        raise ProtocolError("bad_field", f"'{ALL_FIELD}' must be true or false")
    values: dict[str, frozenset[str]] = {}
    total = 1 if every else 0
    for name in FILTER_FIELDS:
        raw = obj.get(name, [])
        if not isinstance(raw, list):
            raise ProtocolError("bad_field", f"{name!r} must be a list of strings")
        for item in raw:
            if not isinstance(item, str) or not item:
                raise ProtocolError("bad_field", f"{name!r} must hold non-empty strings")
            if len(item) > max_item_len:
                raise ProtocolError("bad_field", f"an entry of {name!r} is longer than "
                                    f"{max_item_len} characters")
        values[name] = frozenset(raw)
        total += len(values[name])
    if every:
        values["prefixes"] = values["prefixes"] | {ALL_PREFIX}
    if total == 0:
        raise ProtocolError("bad_field", f"{op} needs at least one of {', '.join(FILTER_FIELDS)}"
                                         f" or \"{ALL_FIELD}\": true")
    if total > max_items:
        raise ProtocolError("too_many_filters", f"{total} entries in one frame, limit {max_items}")
    return ClientRequest(op, **values)


# -- subscriptions -----------------------------------------------------------------------


@dataclass
class Subscription:
    """What one client wants: a union of exact ids, id prefixes, classes and locations."""

    devices: set[str] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)
    classes: set[str] = field(default_factory=set)
    locations: set[str] = field(default_factory=set)

    def size(self) -> int:
        return len(self.devices) + len(self.prefixes) + len(self.classes) + len(self.locations)

    def is_empty(self) -> bool:
        return self.size() == 0

    def apply(self, request: ClientRequest) -> None:
        for name in FILTER_FIELDS:
            current: set[str] = getattr(self, name)
            change: frozenset[str] = getattr(request, name)
            if request.op == "subscribe":
                current |= change
            else:
                current -= change

    def matches(self, device_id: str, attrs: tuple[str, str]) -> bool:
        """The subscription rule for one device with registry ``attrs`` (class, location).

        The reference definition: ``Fanout`` routes through an index that must agree with it
        (a property test checks that).
        """
        if device_id in self.devices:
            return True
        if any(device_id.startswith(p) for p in self.prefixes):
            return True
        device_class, location = attrs
        return device_class in self.classes or location in self.locations

    def filters(self) -> Filters:
        """A copy of the filter sets, by field name."""
        return {name: set(getattr(self, name)) for name in FILTER_FIELDS}

    def describe(self) -> dict[str, list[str] | bool]:
        described: dict[str, list[str] | bool] = {
            name: sorted(getattr(self, name)) for name in FILTER_FIELDS}
        described["prefixes"] = sorted(self.prefixes - {ALL_PREFIX})
        described[ALL_FIELD] = ALL_PREFIX in self.prefixes
        return described
