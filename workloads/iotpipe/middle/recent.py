"""The most recently appended log records, held in memory for feed deliveries."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

__all__ = ["RecentRecords"]


class RecentRecords:
    """The most recently appended log records, kept in memory for feed deliveries.

    A consumer that keeps up reads what was just appended; serving it from here saves a
    read and a re-parse of the log file. Older ranges come from the log itself.

    Records are kept per appended group (the list the append was given), so an append
    costs one list reference and one byte count, not bookkeeping per record; the oldest
    groups are dropped whole once the budget is exceeded (the newest is always kept).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._firsts: list[int] = []  # first seq of each held group, ascending
        self._groups: list[Sequence[bytes]] = []
        self._sizes: list[int] = []  # payload bytes of each group
        self._total = 0
        self._next = 0  # seq after the newest held record

    def extend(self, first_seq: int, records: Sequence[bytes]) -> None:
        if first_seq != self._next:  # not contiguous: start over
            self._firsts, self._groups, self._sizes, self._total = [], [], [], 0
            self._next = first_seq
        if not records:
            return
        size = sum(map(len, records))
        self._firsts.append(first_seq)
        self._groups.append(records)
        self._sizes.append(size)
        self._total += size
        self._next = first_seq + len(records)
        if self._total > self.max_bytes:
            # Drop the oldest groups down to half the budget, so trimming is amortised.
            drop = 0
            while drop < len(self._sizes) - 1 and self._total > self.max_bytes // 2:
                self._total -= self._sizes[drop]
                drop += 1
            del self._firsts[:drop], self._groups[:drop], self._sizes[:drop]

    def get(self, first: int, max_records: int, max_bytes: int) -> list[bytes] | None:
        """Records from ``first`` on (at least one), or None when ``first`` is not held."""
        if not self._firsts or first < self._firsts[0] or first >= self._next:
            return None
        index = bisect_right(self._firsts, first) - 1
        start = first - self._firsts[index]
        out = list(self._groups[index][start:start + max_records])
        index += 1
        while len(out) < max_records and index < len(self._groups):
            out.extend(self._groups[index][:max_records - len(out)])
            index += 1
        if len(out) > 1 and sum(map(len, out)) > max_bytes:
            # The rare delivery that hits the byte limit: as many as fit, at least one.
            del out[max(1, bisect_right(list(accumulate(map(len, out))), max_bytes)):]
        return out
