"""The most recently appended log records, held in memory for feed deliveries."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from iotpipe.middle import hot

__all__ = ["RecentRecords"]


class RecentRecords:
    """The most recently appended log records, kept in memory for feed deliveries.

    A consumer that keeps up reads what was just appended; serving it from here saves a
    read and a re-parse of the log file. Older ranges come from the log itself.

    Records are kept as the appended groups (the caller's sequences: lists, or runs of one
    buffer from ``hot.log_run``, which it must not change afterwards) and handed out as
    slices of them, never joined: ``hot.pack_runs`` packs a delivery straight from its
    parts. Over budget, the oldest groups are dropped, never the newest, so the memory held
    is at most ``max_bytes`` plus the newest group. Dropping a group at a time frees a
    group's records at a time: a flat list trimmed to half its budget in one go freed some
    100,000 records at once, a stall of about 7 ms on the loop every 32 MiB.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # (first seq, records, their bytes)
        self._groups: deque[tuple[int, Sequence[bytes], int]] = deque()
        self._bytes = 0
        self._end = 0  # the seq after the newest record held

    def extend(self, first_seq: int, records: Sequence[bytes]) -> None:
        if first_seq != self._end:  # not contiguous: start over
            self._groups.clear()
            self._bytes = 0
        self._end = first_seq + len(records)
        if not records:
            return
        size = hot.total_bytes(records)
        groups = self._groups
        groups.append((first_seq, records, size))
        self._bytes += size
        while self._bytes > self.max_bytes and len(groups) > 1:
            self._bytes -= groups.popleft()[2]

    def get(self, first: int, max_records: int, max_bytes: int
            ) -> list[Sequence[bytes]] | None:
        """Records from ``first`` on (at least one, at most ``max_records`` and, beyond the
        first, ``max_bytes``) as slices of the held groups, in order; None when ``first``
        is not held."""
        groups = self._groups
        if not groups or first < groups[0][0] or first >= self._end:
            return None
        # Consumers read near the newest records: search from that end.
        index = len(groups) - 1
        while groups[index][0] > first:
            index -= 1
        parts: list[Sequence[bytes]] = []
        wanted, budget = max_records, max_bytes
        start = first - groups[index][0]
        while wanted > 0 and index < len(groups):
            _, held, size = groups[index]
            part = held[start:start + wanted] if start or wanted < len(held) else held
            part_bytes = size if part is held else hot.total_bytes(part)
            if part_bytes > budget:
                fit = hot.count_within(part, budget)
                if fit == 0 and not parts:
                    fit = 1  # one record always goes, however large
                if fit:
                    parts.append(part[:fit])
                break
            parts.append(part)
            wanted -= len(part)
            budget -= part_bytes
            index += 1
            start = 0
        return parts
