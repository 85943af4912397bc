"""Token-bucket pacing of KV bytes, shared by every transfer (and thread) on one site pair.

A sender reserves the bytes it is about to put on the wire and waits the returned delay; the
bucket's level may go negative, so concurrent senders queue behind each other's debt. Over any
interval ``T`` at most ``burst_bytes + rate * T`` bytes leave: with a burst of a few milliseconds
of budget, no one-second window exceeds the budget by more than a fraction of a percent.
"""

from __future__ import annotations

import asyncio
import threading
import time


class TokenBucket:
    """A thread-safe token bucket of ``rate_gbps`` (0: unlimited) holding at most ``burst_bytes``."""

    def __init__(self, rate_gbps: float, burst_bytes: int) -> None:
        if rate_gbps < 0 or burst_bytes <= 0:
            raise ValueError(f"rate_gbps must be >= 0 and burst_bytes > 0, got {rate_gbps}, {burst_bytes}")
        self.rate_gbps = rate_gbps
        self.burst_bytes = burst_bytes
        self._bytes_per_s = rate_gbps * 1e9 / 8
        self._lock = threading.Lock()
        self._level = float(burst_bytes)
        self._stamp = time.monotonic()

    @property
    def unlimited(self) -> bool:
        """True when the bucket never delays."""
        return self._bytes_per_s == 0

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` now; return the seconds the caller must wait before sending them."""
        if self._bytes_per_s == 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._level = min(self.burst_bytes, self._level + (now - self._stamp) * self._bytes_per_s)
            self._stamp = now
            self._level -= nbytes
            return max(0.0, -self._level / self._bytes_per_s)

    def wait_blocking(self, nbytes: int) -> None:
        """Reserve and sleep in this (non-event-loop) thread."""
        delay = self.reserve(nbytes)
        if delay > 0:
            time.sleep(delay)

    async def wait(self, nbytes: int) -> None:
        """Reserve and sleep on the event loop."""
        delay = self.reserve(nbytes)
        if delay > 0:
            await asyncio.sleep(delay)
