"""One direction of an emulated WAN link (bandwidth clock, delay, loss, up/down) and the forwards that cross it."""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from libs.lab.wan_pump import Pump

MSS_BYTES = 1448
DEFAULT_WINDOW_BYTES = 32 * 1024 * 1024  # each connection's receive window (the relay's in-flight cap before windows)
PIPE_BYTES = 1024 * 1024  # the largest chunk: one pipe of the delay line
BURST_S = 0.005  # credit a direction may bank: absorbs the relay's own scheduling stalls on a busy machine
_CHUNK_S = 0.002  # below the pipe size, read what the link moves in this long (smooth pacing at low rates)
_MIN_CHUNK = 16 * 1024
_POLL_S = 0.05  # how often a wait for the link to come back looks at a closed connection


@dataclass(frozen=True)
class Forward:
    """Clients at site ``src`` connect to ``listen``; the relay carries them to ``target`` at the other site."""

    src: str
    listen: tuple[str, int]
    target: tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> Forward:
        """``SRC@LISTEN_HOST:PORT=TARGET_HOST:PORT`` (ValueError names what is malformed)."""
        src, at, rest = text.partition("@")
        listen, eq, target = rest.partition("=")
        if not (src and at and eq):
            raise ValueError(f"forward {text!r}: expected SRC_SITE@LISTEN_HOST:PORT=TARGET_HOST:PORT")
        return cls(src, _host_port(listen, text), _host_port(target, text))

    def __str__(self) -> str:
        return f"{self.src}@{self.listen[0]}:{self.listen[1]}={self.target[0]}:{self.target[1]}"


def _host_port(text: str, whole: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"forward {whole!r}: {text!r} is not HOST:PORT")
    return host, int(port)


class Direction:
    """One direction of a link: a bandwidth all its connections share, a one-way delay, loss, TCP settings, up or down."""

    def __init__(
        self,
        src: str,
        dst: str,
        gbps: float,
        delay_ms: float,
        loss_pct: float,
        *,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        slow_start_after_idle: bool = True,
    ) -> None:
        self.src, self.dst = src, dst
        self.gbps, self.delay_ms, self.loss_pct = gbps, delay_ms, loss_pct
        self.window_bytes = window_bytes  # each connection's receive window: the most it may have in flight
        self.slow_start_after_idle = slow_start_after_idle  # Linux's tcp_slow_start_after_idle on the sending host
        self.up = True
        self._finished_bytes = 0  # delivered by connections that have ended
        self._pumps: set[Pump] = set()
        self._clock = 0.0  # when the last reserved byte has been serialised (time.monotonic)
        self._cond = threading.Condition(threading.Lock())

    def configure(
        self,
        *,
        gbps: float | None = None,
        delay_ms: float | None = None,
        loss_pct: float | None = None,
        slow_start_after_idle: bool | None = None,
    ) -> None:
        """Change some figures; chunks already in flight keep the delay they were given."""
        with self._cond:
            if gbps is not None:
                self.gbps = gbps
            if delay_ms is not None:
                self.delay_ms = delay_ms
            if loss_pct is not None:
                self.loss_pct = loss_pct
            if slow_start_after_idle is not None:
                self.slow_start_after_idle = slow_start_after_idle

    def set_up(self, up: bool) -> None:
        """Cut (False) or restore (True) the direction; waiting chunks go on when it returns."""
        with self._cond:
            self.up = up
            self._clock = max(self._clock, time.monotonic())
            self._cond.notify_all()

    def wait_up(self, closed: threading.Event) -> bool:
        """Block while the direction is down; False if ``closed`` was set meanwhile."""
        if self.up:
            return not closed.is_set()
        with self._cond:
            while not self.up and not closed.is_set():
                self._cond.wait(_POLL_S)
        return not closed.is_set()

    def reserve(self, nbytes: int, *, credit: bool) -> float:
        """When the last of ``nbytes`` read now has crossed the link's bandwidth (time.monotonic).

        ``credit``: the bytes were waiting for the relay, so up to ``BURST_S`` of its own lateness is
        made up; without it (the sender was idle) the link starts from now, as a real one would.
        """
        with self._cond:
            now = time.monotonic()
            if math.isinf(self.gbps):
                return now
            self._clock = max(self._clock, now - BURST_S if credit else now) + nbytes * 8 / (self.gbps * 1e9)
            return max(self._clock, now)

    def mathis_bps(self) -> float:
        """The rate one TCP connection sustains at this loss and RTT (inf without loss)."""
        p = self.loss_pct / 100
        if p <= 0:
            return math.inf
        rtt_s = max(2 * self.delay_ms, 1.0) / 1000
        return MSS_BYTES * 8 * 1.22 / (rtt_s * math.sqrt(p))

    def chunk_bytes(self) -> int:
        """Largest chunk to read at once: what the link moves in about 2 ms (smooth pacing at low rates)."""
        rate_bps = min(self.gbps * 1e9, self.mathis_bps())
        if math.isinf(rate_bps):
            return PIPE_BYTES
        return max(_MIN_CHUNK, min(PIPE_BYTES, int(rate_bps / 8 * _CHUNK_S)))

    def retransmit_delay_s(self, nbytes: int, rng: random.Random) -> float:
        """One RTT if a segment of this chunk is lost (sampled), else 0."""
        p = self.loss_pct / 100
        if p <= 0 or rng.random() >= 1 - (1 - p) ** (nbytes / MSS_BYTES):
            return 0.0
        return max(2 * self.delay_ms, 1.0) / 1000

    def attach(self, pump: Pump) -> None:
        """Count ``pump``'s bytes in this direction."""
        with self._cond:
            self._pumps.add(pump)

    def detach(self, pump: Pump) -> None:
        """Keep the bytes of an ended pump."""
        with self._cond:
            self._pumps.discard(pump)
            self._finished_bytes += pump.bytes

    @property
    def bytes(self) -> int:
        """Bytes delivered to the far side so far."""
        with self._cond:
            return self._finished_bytes + sum(p.bytes for p in self._pumps)

    def figures(self) -> dict:
        """Settings and counters, JSON-ready (``gbps`` null when unlimited)."""
        delivered = self.bytes
        with self._cond:
            return {
                "src": self.src,
                "dst": self.dst,
                "gbps": None if math.isinf(self.gbps) else self.gbps,
                "delay_ms": self.delay_ms,
                "loss_pct": self.loss_pct,
                "window_bytes": self.window_bytes,
                "slow_start_after_idle": self.slow_start_after_idle,
                "up": self.up,
                "bytes": delivered,
            }
