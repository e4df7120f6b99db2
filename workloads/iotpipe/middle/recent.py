"""The most recently appended log records, held in memory for feed deliveries."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate, islice

__all__ = ["RecentRecords"]


class RecentRecords:
    """The most recently appended log records, kept in memory for feed deliveries.

    A consumer that keeps up reads what was just appended; serving it from here saves a
    read and a re-parse of the log file. Older ranges come from the log itself.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._base = 0  # seq of self._records[0]
        self._records: list[bytes] = []
        # Running byte total after each record, counted from the last reset, so a byte
        # limit becomes one bisect instead of a loop over records.
        self._cum: list[int] = []
        self._cum_before = 0  # running total before self._records[0]

    def extend(self, first_seq: int, records: Sequence[bytes]) -> None:
        if first_seq != self._base + len(self._records):  # not contiguous: start over
            self._base, self._records, self._cum, self._cum_before = first_seq, [], [], 0
        if not records:
            return
        before = self._cum[-1] if self._cum else self._cum_before
        self._records.extend(records)
        cum = self._cum
        cum.extend(islice(accumulate(map(len, records), initial=before), 1, None))
        total = cum[-1]
        if total - self._cum_before > self.max_bytes:
            # Drop the oldest down to half the budget, so trimming is amortised.
            drop = bisect_right(cum, total - self.max_bytes // 2)
            if drop:
                self._cum_before = cum[drop - 1]
                del self._records[:drop]
                del cum[:drop]
                self._base += drop

    def get(self, first: int, max_records: int, max_bytes: int) -> list[bytes] | None:
        """Records from ``first`` on (at least one), or None when ``first`` is not held."""
        start = first - self._base
        if start < 0 or start >= len(self._records):
            return None
        before = self._cum[start - 1] if start else self._cum_before
        stop = min(len(self._records), start + max_records)
        end = max(start + 1, bisect_right(self._cum, before + max_bytes, start, stop))
        return self._records[start:end]
