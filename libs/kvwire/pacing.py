"""Token-bucket pacing of KV bytes on one site pair, shared by every transfer (and thread) of a process.

Bytes are taken from the bucket at the moment they are about to leave, never reserved ahead: a
sender that was starved (descheduled by a busy CPU, or waiting for the engine's next layer) finds
at most ``burst_s`` of budget when it comes back, so it cannot catch up in a burst. Over any
interval ``T`` a bucket lets out at most ``rate * T`` plus its burst, or one chunk if a chunk is
larger; each sending thread holds at most one chunk between taking and sending.

The rate may change at any time (the process's share of a site-wide budget, ``libs.kvwire.sharing``);
a rate of 0 pauses the bucket, and a lease, when set, pauses it once it expires.

Transfers are served oldest first: a sender passes its transfer's ``order`` (lower = older) and,
while a sender of an older transfer waits for tokens, younger ones do not take any. A transfer
whose next bytes are not ready yet (its prefill is still computing) does not hold the others back.
Equal sharing would stretch every transfer in flight when the link is short; oldest first
finishes each as early as it can (its request's first token is not delayed by younger ones).

The bucket also times each order's wait: the wall time during which at least one of its senders
waited for tokens (overlapping waits of a transfer's connections count once), read by
``waited_s`` and dropped by ``forget`` when the transfer ends.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import Counter
from collections.abc import Callable

MAX_SLEEP_S = 0.02  # a waiting sender looks again at least this often (rate changes, stop requests)


class TokenBucket:
    """A thread-safe token bucket of ``rate_gbps`` (0 at construction: unlimited for life)."""

    def __init__(self, rate_gbps: float, burst_s: float = 0.02, min_burst_bytes: int = 256 << 10) -> None:
        if not (rate_gbps >= 0 and burst_s > 0 and min_burst_bytes > 0) or math.isinf(rate_gbps):
            raise ValueError(
                f"need a finite rate_gbps >= 0 and positive bursts, got {rate_gbps}, {burst_s}, {min_burst_bytes}"
            )
        self.unlimited = rate_gbps == 0
        self.burst_s = burst_s
        self.min_burst_bytes = min_burst_bytes
        self._lock = threading.Lock()
        self._bytes_per_s = 0.0
        self.burst_bytes = min_burst_bytes
        self._set(rate_gbps)
        self._level = float(self.burst_bytes)
        self._stamp = time.monotonic()
        self._lease_until = math.inf
        self.granted_bytes = 0  # total bytes let out
        self._limited = False  # a sender had to wait since the last ``take_limited``
        self._waiting: Counter[int] = Counter()  # orders of senders waiting for tokens
        self._wait_began: dict[int, float] = {}  # order -> when its senders began waiting (while some wait)
        self._waited: dict[int, float] = {}  # order -> seconds its senders waited, waits that ended
        self.on_limited: Callable[[], None] | None = None  # called (any thread) when a sender first waits

    @property
    def rate_gbps(self) -> float:
        """The current rate (0: paused, or unlimited)."""
        return self._bytes_per_s * 8 / 1e9

    def _set(self, rate_gbps: float) -> None:
        self._bytes_per_s = rate_gbps * 1e9 / 8
        self.burst_bytes = max(int(self._bytes_per_s * self.burst_s), self.min_burst_bytes)

    def set_rate(self, rate_gbps: float) -> None:
        """Change the rate of a limited bucket (0 pauses it); tokens held are kept up to the new burst."""
        if self.unlimited:
            raise ValueError("an unlimited bucket has no rate to set")
        if not rate_gbps >= 0 or math.isinf(rate_gbps):
            raise ValueError(f"rate_gbps must be finite and >= 0, got {rate_gbps}")
        with self._lock:
            self._refill(time.monotonic())
            self._set(rate_gbps)
            self._level = min(self._level, self.burst_bytes)

    def renew_lease(self, until: float) -> None:
        """Let bytes out only until the monotonic time ``until`` (then the bucket pauses until renewed)."""
        with self._lock:
            self._lease_until = until

    def held_bytes(self) -> float:
        """Tokens held now (at most the burst): what the bucket would let out at once, over its rate."""
        if self.unlimited:
            return 0.0
        with self._lock:
            self._refill(time.monotonic())
            return max(self._level, 0.0)

    def take_limited(self) -> bool:
        """Whether a sender had to wait since the last call (and reset)."""
        with self._lock:
            limited, self._limited = self._limited, False
            return limited

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._level = min(self.burst_bytes, self._level + (now - self._stamp) * self._bytes_per_s)
        self._stamp = now

    def take(self, nbytes: int, order: int = 0) -> float:
        """Take ``nbytes`` now and return 0, or take nothing and return the seconds to wait before asking again.

        Nothing is taken for a sender of ``order`` while one of an older (lower) order waits.
        """
        if self.unlimited:
            return 0.0
        notify = False
        with self._lock:
            now = time.monotonic()
            self._refill(now)
            need = min(nbytes, self.burst_bytes)  # a chunk larger than the burst goes out of a full bucket
            older_waiting = bool(self._waiting) and min(self._waiting) < order
            if self._level >= need and now < self._lease_until and self._bytes_per_s > 0 and not older_waiting:
                self._level -= nbytes
                self.granted_bytes += nbytes
                return 0.0
            notify = not self._limited
            self._limited = True
            paused = self._bytes_per_s == 0 or now >= self._lease_until
            wait = MAX_SLEEP_S if paused else (need - self._level) / self._bytes_per_s
        if notify and self.on_limited is not None:
            self.on_limited()
        return min(max(wait, 1e-4), MAX_SLEEP_S)

    def _queue(self, order: int, joining: bool) -> None:
        with self._lock:
            now = time.monotonic()
            self._waiting[order] += 1 if joining else -1
            if joining and self._waiting[order] == 1:
                self._wait_began[order] = now
            if not self._waiting[order]:
                del self._waiting[order]
                self._waited[order] = self._waited.get(order, 0.0) + now - self._wait_began.pop(order)

    def waited_s(self, order: int = 0) -> float:
        """Wall time during which a sender of ``order`` waited for tokens (overlapping waits count once)."""
        with self._lock:
            began = self._wait_began.get(order)
            return self._waited.get(order, 0.0) + (time.monotonic() - began if began is not None else 0.0)

    def forget(self, order: int) -> None:
        """Drop the wait time of ``order`` (its transfer ended)."""
        with self._lock:
            self._waited.pop(order, None)

    def wait_blocking(self, nbytes: int, stop: threading.Event, order: int = 0) -> bool:
        """Take ``nbytes``, sleeping in this (non-event-loop) thread as needed; False if ``stop`` was set."""
        delay = self.take(nbytes, order)
        if delay == 0.0:
            return True
        self._queue(order, True)
        try:
            while not stop.wait(delay):
                delay = self.take(nbytes, order)
                if delay == 0.0:
                    return True
            return False
        finally:
            self._queue(order, False)

    async def wait(self, nbytes: int, order: int = 0) -> None:
        """Take ``nbytes``, sleeping on the event loop as needed."""
        delay = self.take(nbytes, order)
        if delay == 0.0:
            return
        self._queue(order, True)
        try:
            while delay:
                await asyncio.sleep(delay)
                delay = self.take(nbytes, order)
        finally:
            self._queue(order, False)
