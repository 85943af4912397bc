"""One direction of one relayed connection's congestion window: slow start from 10 segments, restart after idle.

Bytes in flight are those sent (read from the sender) and not yet acknowledged; an acknowledgement
is posted by the writer thread when it delivers a chunk, due one return delay later. While the
window limits the sender, each acknowledged byte adds one to the window, so it doubles per round
trip, up to the receive window. The window limits the sender as Linux judges it in slow start:
it is under twice the largest in flight of the current window of data (``max_packets_out``,
renewed once all that was in flight when it was set is acknowledged), so a keepalive or a sender
slower than the link does not grow it. Without loss there is no congestion avoidance. After idle,
the window restarts from 10 segments (RFC 5681 4.1); Linux's ``tcp_cwnd_restart`` halves it per
idle RTO down to that, so for idle periods of a few RTOs Linux keeps more than this does.
Threading: :meth:`acknowledge` from any thread, the rest from the reader thread only.
"""

from __future__ import annotations

import math
import queue
from collections import deque

from libs.lab.wan_link import DEFAULT_WINDOW_BYTES, MSS_BYTES

__all__ = ["DEFAULT_WINDOW_BYTES", "INITIAL_WINDOW_BYTES", "CongestionWindow", "rto_s"]

INITIAL_WINDOW_BYTES = 10 * MSS_BYTES  # Linux's initial window (RFC 6928)
RTO_MIN_S = 0.2  # Linux's TCP_RTO_MIN


def rto_s(rtt_s: float) -> float:
    """Linux's retransmission timeout on a path of steady ``rtt_s``: srtt + max(4 rttvar, 200 ms) = RTT + 200 ms."""
    return rtt_s + RTO_MIN_S


class CongestionWindow:
    """What one direction of one connection may have in flight: the congestion window, capped by the receive window."""

    def __init__(self, window_bytes: int = DEFAULT_WINDOW_BYTES) -> None:
        self.window_bytes = window_bytes
        self.cwnd_bytes = min(INITIAL_WINDOW_BYTES, window_bytes)
        self.in_flight = 0
        self._sent = self._acked = 0  # bytes, since the start
        self._peak = 0  # largest in flight of the current window of data
        self._peak_until = 0  # the window ends once ``_acked`` reaches this
        self._last_send = -math.inf
        self._posted: queue.SimpleQueue[tuple[float, int]] = queue.SimpleQueue()  # (due, bytes) from the writer
        self._pending: deque[tuple[float, int]] = deque()  # taken from _posted, not yet due

    def acknowledge(self, nbytes: int, at: float) -> None:
        """``nbytes`` delivered; their acknowledgement reaches the sender at ``at`` (time.monotonic, in order)."""
        self._posted.put((at, nbytes))

    def collect(self, now: float) -> None:
        """Apply every acknowledgement due by ``now``."""
        self._take_posted()
        while self._pending and self._pending[0][0] <= now:
            _, nbytes = self._pending.popleft()
            if self.cwnd_bytes < 2 * self._peak:  # the window limits the sender: slow start grows it
                self.cwnd_bytes = min(self.cwnd_bytes + nbytes, self.window_bytes)
            self.in_flight -= nbytes
            self._acked += nbytes

    def restart_if_idle(self, now: float, rto_s: float) -> bool:
        """Back to the initial window if nothing is in flight and nothing was sent for over ``rto_s`` (RFC 5681 4.1)."""
        if self.in_flight or now - self._last_send <= rto_s:
            return False
        self.cwnd_bytes = min(INITIAL_WINDOW_BYTES, self.window_bytes)
        return True

    def sent(self, nbytes: int, now: float) -> None:
        """``nbytes`` left at ``now``."""
        self.in_flight += nbytes
        self._sent += nbytes
        self._last_send = now
        if self._acked >= self._peak_until or self.in_flight > self._peak:  # Linux's tcp_cwnd_validate
            self._peak, self._peak_until = self.in_flight, self._sent

    def room(self) -> int:
        """Bytes that may be sent now (as of the last :meth:`collect`)."""
        return max(0, min(self.cwnd_bytes, self.window_bytes) - self.in_flight)

    def next_ack_at(self, timeout_s: float) -> float | None:
        """When the next acknowledgement is due, waiting up to ``timeout_s`` for one to be posted; None if none was."""
        self._take_posted()
        if not self._pending:
            try:
                self._pending.append(self._posted.get(timeout=timeout_s))
            except queue.Empty:
                return None
        return self._pending[0][0]

    def _take_posted(self) -> None:
        while True:
            try:
                self._pending.append(self._posted.get_nowait())
            except queue.Empty:
                return
