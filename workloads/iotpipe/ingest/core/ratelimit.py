"""Token-bucket rate limiting per device, sans-I/O: the caller passes the clock."""

from __future__ import annotations

import math

__all__ = ["DeviceBuckets", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; one token per message."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def _refill(self, now: float) -> None:
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def take(self, wanted: int, now: float) -> int:
        """Take up to ``wanted`` tokens; returns how many were granted (0..wanted)."""
        self._refill(now)
        granted = min(wanted, int(self._tokens))
        self._tokens -= granted
        return granted

    def retry_after_ms(self, wanted: int, now: float) -> int:
        """Milliseconds until ``wanted`` (capped at burst) tokens are available."""
        self._refill(now)
        missing = min(wanted, self.burst) - self._tokens
        return 0 if missing <= 0 else max(1, math.ceil(missing / self.rate * 1000))


class DeviceBuckets:
    """One token bucket per device id, shared by that device's connections in one process."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst if burst > 0 else max(1.0, 2 * rate)
        self._buckets: dict[str, tuple[TokenBucket, int]] = {}

    def acquire(self, device: str | None, now: float) -> TokenBucket | None:
        """The bucket of a new connection of ``device`` (None: no rate limit)."""
        if self.rate <= 0:
            return None
        if device is None:  # insecure mode, device named per message: one per connection
            return TokenBucket(self.rate, self.burst, now)
        bucket, users = self._buckets.get(device) or (TokenBucket(self.rate, self.burst, now), 0)
        self._buckets[device] = (bucket, users + 1)
        return bucket

    def release(self, device: str | None) -> None:
        """A connection of ``device`` closed; its bucket goes with its last connection."""
        entry = None if device is None else self._buckets.get(device)
        if device is None or entry is None:
            return
        bucket, users = entry
        if users <= 1:
            del self._buckets[device]
        else:
            self._buckets[device] = (bucket, users - 1)
