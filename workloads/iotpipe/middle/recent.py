"""The most recently appended log records, held in memory for feed deliveries."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

__all__ = ["RecentRecords"]


class RecentRecords:
    """The most recently appended log records, kept in memory for feed deliveries.

    A consumer that keeps up reads what was just appended; serving it from here saves a
    read and a re-parse of the log file. Older ranges come from the log itself.

    Sizes are kept per appended group, not per record (a running total per record cost an
    int object and a list slot for every record of every group): over budget, whole groups
    are dropped, oldest first, down to half the budget, never the newest. So the memory
    held is at most ``max_bytes`` plus the newest group.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._base = 0  # seq of self._records[0]
        self._records: list[bytes] = []
        self._groups: deque[tuple[int, int]] = deque()  # (records, bytes) per extend
        self._bytes = 0  # bytes of self._records

    def extend(self, first_seq: int, records: Sequence[bytes]) -> None:
        if first_seq != self._base + len(self._records):  # not contiguous: start over
            self._base, self._records, self._bytes = first_seq, [], 0
            self._groups.clear()
        if not records:
            return
        size = sum(map(len, records))
        self._records.extend(records)
        self._groups.append((len(records), size))
        self._bytes += size
        if self._bytes > self.max_bytes:
            # Drop the oldest groups down to half the budget, so trimming is amortised.
            groups, target, drop = self._groups, self.max_bytes // 2, 0
            while len(groups) > 1 and self._bytes > target:
                count, size = groups.popleft()
                drop += count
                self._bytes -= size
            if drop:
                del self._records[:drop]
                self._base += drop

    def get(self, first: int, max_records: int, max_bytes: int) -> list[bytes] | None:
        """Records from ``first`` on (at least one), or None when ``first`` is not held."""
        start = first - self._base
        if start < 0 or start >= len(self._records):
            return None
        records = self._records[start:start + max_records]
        if len(records) > 1 and sum(map(len, records)) > max_bytes:
            total, count = 0, 0
            for record in records:
                total += len(record)
                if total > max_bytes:
                    break
                count += 1
            del records[max(1, count):]
        return records
