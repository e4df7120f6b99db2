"""Token-bucket rate limiting per device, sans-I/O: the caller passes the clock."""

from __future__ import annotations

import math

__all__ = ["TokenBucket"]


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
