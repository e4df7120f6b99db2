"""What a simulation run saw: every acked id per device, latencies and the counts the
report prints (``iotpipe simulate --json``)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LATENCY_SAMPLES", "RETRIED_REASONS", "AckedIds", "SimulationReport"]

RETRIED_REASONS = ("rate_limited",)
LATENCY_SAMPLES = 200_000  # reservoir size: percentiles stay exact-ish, memory stays flat


class AckedIds:
    """The set of acked ids of one device in O(gaps) memory: ids are acked mostly in order,
    so everything from ``first`` up to ``floor`` is acked and only ids above it are kept in a
    set."""

    __slots__ = ("_above", "first", "floor")

    def __init__(self, first: int = 1) -> None:
        self.first = first
        self.floor = first - 1
        self._above: set[int] = set()

    def add(self, msg_id: int) -> None:
        if msg_id <= self.floor:
            return
        self._above.add(msg_id)
        while self.floor + 1 in self._above:
            self.floor += 1
            self._above.discard(self.floor)

    def __contains__(self, msg_id: object) -> bool:
        return isinstance(msg_id, int) and (self.first <= msg_id <= self.floor
                                            or msg_id in self._above)

    def __len__(self) -> int:
        return self.floor - self.first + 1 + len(self._above)

    def __iter__(self) -> Iterator[int]:
        yield from range(self.first, self.floor + 1)
        yield from sorted(self._above)


@dataclass
class SimulationReport:
    connections: int = 0
    connected: int = 0
    never_connected: int = 0
    connect_failures: Counter[str] = field(default_factory=Counter)
    refusals: Counter[str] = field(default_factory=Counter)  # "HTTP 401 reason: detail"
    sent: int = 0
    acked: int = 0
    resent: int = 0
    duplicate_acks: int = 0
    unknown_acks: int = 0
    unacked: int = 0
    busy: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    elapsed_s: float = 0.0
    send_elapsed_s: float = 0.0
    acked_at_stop: int = 0
    steady_acks_per_s: float | None = None  # after every device connected, until stop
    latencies_s: list[float] = field(default_factory=list)  # a uniform reservoir sample
    latency_count: int = 0
    acked_ids: dict[str, AckedIds] = field(default_factory=dict)

    def add_latency(self, seconds: float) -> None:
        self.latency_count += 1
        if len(self.latencies_s) < LATENCY_SAMPLES:
            self.latencies_s.append(seconds)
        else:
            slot = random.randrange(self.latency_count)
            if slot < LATENCY_SAMPLES:
                self.latencies_s[slot] = seconds

    def write_acked(self, path: Path) -> None:
        """One 'device_id<TAB>msg_id' line per acked message."""
        with open(path, "w") as out:
            for device_id, ids in self.acked_ids.items():
                out.writelines(f"{device_id}\t{i}\n" for i in ids)

    @property
    def ok(self) -> bool:
        # Connect failures that a reconnect got past are not failures of the run; a
        # device that never connected is.
        return (self.unacked == 0 and self.duplicate_acks == 0 and self.unknown_acks == 0
                and not self.refused and self.acked > 0 and self.never_connected == 0)

    @property
    def refused(self) -> int:
        return sum(n for reason, n in self.errors.items() if reason not in RETRIED_REASONS)

    def percentile(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    def to_dict(self) -> dict[str, Any]:
        p50, p99 = self.percentile(0.50), self.percentile(0.99)
        return {
            "ok": self.ok,
            "connections": self.connections,
            "connected": self.connected,
            "never_connected": self.never_connected,
            "connect_failures": dict(self.connect_failures),
            "refusals": dict(self.refusals),
            "sent": self.sent,
            "acked": self.acked,
            "resent": self.resent,
            "busy": self.busy,
            "duplicate_acks": self.duplicate_acks,
            "unknown_acks": self.unknown_acks,
            "unacked": self.unacked,
            "errors": dict(self.errors),
            "closes": dict(self.closes),
            "reconnects": self.reconnects,
            "elapsed_s": round(self.elapsed_s, 3),
            "acks_per_s": round(self.acked_at_stop / self.send_elapsed_s, 1)
            if self.send_elapsed_s else 0.0,
            "steady_acks_per_s": None if self.steady_acks_per_s is None
            else round(self.steady_acks_per_s, 1),
            "ack_latency_ms": {
                "p50": None if p50 is None else round(p50 * 1000, 3),
                "p99": None if p99 is None else round(p99 * 1000, 3),
            },
        }
