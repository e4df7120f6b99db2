"""Named consumers: their cursors in the ledger, and the reclaim those cursors allow.

A cursor is the last seq its consumer acknowledged. Every change is written to the ledger
(synced) before it takes effect, so a segment is deleted only after a synced ledger shows
every registered consumer past its last record.
"""

from __future__ import annotations

import threading

from .errors import QueueError
from .ledger import MAX_CONSUMER_NAME_BYTES, Ledger
from .segments import SegmentState

__all__ = ["Cursors", "check_consumer_name"]


def check_consumer_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"consumer name must be a non-empty string, got {name!r}")
    if len(name.encode()) > MAX_CONSUMER_NAME_BYTES:
        raise ValueError(f"consumer name longer than {MAX_CONSUMER_NAME_BYTES} bytes: {name!r}")


class Cursors:
    """``{consumer: acked seq}`` over the ledger, guarded by the state's ``cond``.

    ``lock`` serialises ledger writes (taken before ``cond``, and held by ``close`` so no
    write is cut off); ``acked_by`` is replaced, never mutated, once the ledger has it.
    """

    def __init__(self, state: SegmentState, ledger: Ledger, acked_by: dict[str, int]) -> None:
        self._state = state
        self._ledger: Ledger | None = ledger
        self.acked_by = acked_by
        self.lock = threading.Lock()
        self._registering: int | None = None  # cursor of a consumer being registered

    def register(self, name: str) -> None:
        """Register ``name`` (idempotent); a new consumer starts at the oldest retained record."""
        check_consumer_name(name)
        state = self._state
        with self.lock:
            with state.cond:
                state.check_usable()
                if name in self.acked_by:
                    return
                updated = dict(self.acked_by)
                updated[name] = state.segments[0].first_seq - 1
                # Until the ledger has it, reclaim must not pass the new consumer's cursor.
                self._registering = updated[name]
            try:
                self._write(updated)
            finally:
                with state.cond:
                    self._registering = None

    def unregister(self, name: str) -> None:
        """Forget ``name`` and its cursor (idempotent); may free segments."""
        with self.lock:
            with self._state.cond:
                self._state.check_usable()
                if name not in self.acked_by:
                    return
                updated = {k: v for k, v in self.acked_by.items() if k != name}
            self._write(updated)

    def ack(self, consumer: str, seq: int) -> None:
        """Mark every record <= ``seq`` done for ``consumer``; durable on return."""
        state = self._state
        with self.lock:
            with state.cond:
                state.check_usable()
                if consumer not in self.acked_by:
                    raise KeyError(f"unknown consumer {consumer!r} (register it first)")
                if seq > state.durable_seq:
                    raise ValueError(f"cannot ack seq {seq}: the last durable record is "
                                     f"{state.durable_seq}")
                if seq <= self.acked_by[consumer]:
                    return  # cumulative: an older ack is already covered
                updated = dict(self.acked_by)
                updated[consumer] = seq
            self._write(updated)

    def acked(self, consumer: str) -> int:
        with self._state.cond:
            if consumer not in self.acked_by:
                raise KeyError(f"unknown consumer {consumer!r}")
            return self.acked_by[consumer]

    def slowest(self) -> int:
        """The lowest cursor; with no consumer, everything before the oldest record. Holds cond."""
        before_first = self._state.segments[0].first_seq - 1
        return max(min(self.acked_by.values()) if self.acked_by else before_first, before_first)

    def reclaim_locked(self) -> None:
        """Delete sealed segments every registered consumer has acknowledged entirely."""
        if not self.acked_by:
            return
        floor = min(self.acked_by.values())
        if self._registering is not None:
            floor = min(floor, self._registering)
        if self._state.drop_consumed(floor):
            self._state.cond.notify_all()

    def _write(self, updated: dict[str, int]) -> None:
        state = self._state
        assert self._ledger is not None
        try:
            self._ledger.write(updated)
        except OSError as exc:
            with state.cond:
                state.failed = exc
                state.cond.notify_all()
            raise QueueError(f"queue {state.path}: ledger write failed ({exc!r})") from exc
        with state.cond:
            self.acked_by = updated
            self.reclaim_locked()

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None
