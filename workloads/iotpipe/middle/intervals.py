"""Sets of integers as sorted, disjoint ranges: the dedup marks' and the feed's bookkeeping."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator

__all__ = ["IntervalSet"]


class IntervalSet:
    """A set of integers stored as sorted, disjoint, non-adjacent closed ranges."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for first, last in ranges:
            self.add(first, last)

    def copy(self) -> IntervalSet:
        other = IntervalSet()
        other._starts = self._starts.copy()
        other._ends = self._ends.copy()
        return other

    def add(self, first: int, last: int) -> None:
        if first > last:
            raise ValueError(f"empty range [{first}, {last}]")
        starts, ends = self._starts, self._ends
        if not ends or first > ends[-1] + 1:  # fast path: appending past the end
            starts.append(first)
            ends.append(last)
            return
        if first == ends[-1] + 1:  # fast path: extending the last range (in-order batches)
            ends[-1] = last
            return
        # Ranges [i, j) overlap or touch [first, last]; they merge into one.
        i = bisect_left(ends, first - 1)
        j = bisect_right(starts, last + 1)
        if i < j:
            first = min(first, starts[i])
            last = max(last, ends[j - 1])
        starts[i:j] = [first]
        ends[i:j] = [last]

    def remove(self, first: int, last: int) -> None:
        if first > last:
            return
        starts, ends = self._starts, self._ends
        i = bisect_left(ends, first)
        j = bisect_right(starts, last)
        if i >= j:
            return
        new_starts: list[int] = []
        new_ends: list[int] = []
        if starts[i] < first:
            new_starts.append(starts[i])
            new_ends.append(first - 1)
        if ends[j - 1] > last:
            new_starts.append(last + 1)
            new_ends.append(ends[j - 1])
        starts[i:j] = new_starts
        ends[i:j] = new_ends

    def uncovered(self, first: int, last: int) -> list[tuple[int, int]]:
        """The sub-ranges of ``[first, last]`` that are not in the set, in order."""
        out: list[tuple[int, int]] = []
        starts, ends = self._starts, self._ends
        pos = first
        i = bisect_left(ends, first)
        while i < len(starts) and starts[i] <= last:
            if starts[i] > pos:
                out.append((pos, starts[i] - 1))
            pos = max(pos, ends[i] + 1)
            i += 1
        if pos <= last:
            out.append((pos, last))
        return out

    def covers(self, first: int, last: int) -> bool:
        i = bisect_left(self._ends, first)
        return i < len(self._starts) and self._starts[i] <= first and self._ends[i] >= last

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int) and self.covers(value, value)

    def range_containing(self, value: int) -> tuple[int, int] | None:
        i = bisect_left(self._ends, value)
        if i < len(self._starts) and self._starts[i] <= value:
            return self._starts[i], self._ends[i]
        return None

    def next_start_after(self, value: int) -> int | None:
        """The start of the first range that begins after ``value``."""
        i = bisect_right(self._starts, value)
        return self._starts[i] if i < len(self._starts) else None

    def lowest(self) -> tuple[int, int] | None:
        return (self._starts[0], self._ends[0]) if self._starts else None

    def highest(self) -> int:
        """The largest member, or 0 for an empty set."""
        return self._ends[-1] if self._ends else 0

    def close_lowest_hole(self) -> None:
        """Merge the two lowest ranges (the integers between them join the set)."""
        if len(self._starts) >= 2:
            self.add(self._ends[0] + 1, self._starts[1] - 1)

    def count(self) -> int:
        return sum(e - s + 1 for s, e in zip(self._starts, self._ends, strict=True))

    def ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.ranges())

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntervalSet) and self.ranges() == other.ranges()

    def __repr__(self) -> str:
        return f"IntervalSet({self.ranges()!r})"
