"""A user-space WAN link between two sites: bandwidth, one-way delay, loss and partitions over TCP.

There is no kernel traffic shaping here, so every TCP connection that crosses a link goes through
a relay: a client at site A connects to a listener of the A->B forward, the relay connects to the
target at site B, and moves the bytes of each direction through that direction of the link.

- **Bandwidth**: one virtual clock per direction, shared by every connection of that direction
  (the capacity of a real link). A chunk leaves when the clock says the bytes before it have been
  serialised; the reader waits for it, so a full link pushes back on the sender's TCP window. Up
  to 5 ms of credit makes up the relay's own lateness when bytes were waiting for it; bytes that
  find the reader idle start from now (a real link gives no credit for idle time).
- **Delay**: each chunk is delivered ``delay`` after it left (half the RTT per direction), in
  order: one FIFO per connection and direction, so nothing is ever reordered, even when the delay
  is lowered at run time.
- **Loss**: bytes cannot be dropped inside a TCP stream, so loss is emulated by what it does to
  TCP: a chunk that contains a lost segment (each 1,448-byte segment lost with probability p)
  arrives one RTT late (a fast retransmit, with the head-of-line blocking that follows), and each
  connection is held to the Mathis et al. rate ``MSS * 1.22 / (RTT * sqrt(p))`` (RTT at least 1 ms).
- **TCP**: each connection behaves as TCP would over the path. Its handshake costs a round trip:
  the client's connect is accepted at once, the target is connected one way later (when the SYN
  would arrive), the client's bytes leave one RTT after the connect and the target's once the
  client's ACK would have reached it (a refused connect reaches the client one RTT after it). Each
  direction of a connection has a congestion window (:mod:`libs.lab.wan_cwnd`): 10 segments at
  first, growing by each acknowledged byte (an acknowledgement comes back one return delay after
  its chunk was due at the far end, or after it arrived if the receiver held it up) while it limits
  the sender, so it doubles per RTT until the connection's share of the bandwidth or the receive
  window (``window_bytes``, 32 MiB) limits it; a chunk is at most an eighth of the window, so a
  round's first acknowledgement is not held back by a large chunk. After an idle period longer than
  the RTO (RTT + 200 ms, Linux's with a steady RTT) with nothing in flight the window restarts from
  10 segments (RFC 5681; Linux halves it per idle RTO down to that), unless
  ``slow_start_after_idle`` is off (a tuned host). :func:`libs.lab.wan_tcp_model.delivery_time_s`
  is the model it is judged against (``prfaas bench wan``).
- **Figures** (``LinkRelay.figures``, the control endpoint's ``GET /link``): per direction its
  settings, the bytes it delivered, its live goodput (bytes delivered over the last second,
  sampled every 0.1 s), its utilisation (that over its bandwidth; null when unlimited) and the
  connections open from its source site.
- **Partition**: ``blackhole`` (the default) stops every byte in both directions, as a real cut
  does: connections stay open and silent, new ones are accepted but not carried, and the
  endpoints notice only through their own deadlines and pings (the lab's NATS servers ping every
  second); when the link returns, held data flows on. ``reset`` ends every connection at once
  (FIN, then RST) and refuses new ones, like a restarted middlebox.

Bytes move with ``os.splice`` (socket -> pipe -> socket, never through Python), with blocking
sockets and a reader and a writer thread per connection and direction; the pipes are the delay
line, each holds one chunk of at most 1 MiB (32 per connection and direction: 32 MiB on its way,
25 ms one way at 10 Gbps); before each chunk the reader polls for data (so an idle restart is
decided when a byte is there to send) and reads no more than the window allows.
Measured here: 1 MiB chunks cost about 0.32 CPU-s per GB at 10 Gbps against about 0.45 for
256 KiB, and one asyncio loop driving every connection (non-blocking splices, timers) cost more
than the threads. Unprivileged users get 1 MiB pipes within their pipe budget
(``/proc/sys/fs/pipe-user-pages-soft``); beyond it pipes are smaller and chunks follow. Linux only.
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from collections import deque

from libs.lab.wan_link import DEFAULT_WINDOW_BYTES, Direction, Forward
from libs.lab.wan_pump import Connection

__all__ = ["Direction", "Forward", "LinkRelay"]

LIVE_WINDOW_S = 1.0  # the live goodput is over the last second
_SAMPLE_S = 0.1


class _Meter:
    """Bytes each direction delivered, sampled every ``_SAMPLE_S``: their rate over the last ``LIVE_WINDOW_S``."""

    def __init__(self, directions: list[Direction]) -> None:
        self._directions = directions
        self._samples: deque[tuple[float, list[int]]] = deque()
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def run(self) -> None:
        """Sample until stopped (a thread of its own)."""
        while not self.stop.wait(_SAMPLE_S):
            self.goodput_gbps()

    def goodput_gbps(self) -> list[float]:
        """Each direction's Gbps from the sample a window ago (or the oldest one) to now; keeps this sample."""
        now, delivered = time.monotonic(), [d.bytes for d in self._directions]
        with self._lock:
            self._samples.append((now, delivered))
            while len(self._samples) > 1 and self._samples[1][0] <= now - LIVE_WINDOW_S:
                self._samples.popleft()
            then, before = self._samples[0]
        if now - then <= 0:
            return [0.0] * len(delivered)
        return [(b - a) * 8 / (now - then) / 1e9 for a, b in zip(before, delivered, strict=True)]


class LinkRelay:
    """Both directions of the link between two sites, and the forwards that cross it."""

    def __init__(
        self,
        sites: tuple[str, str],
        *,
        gbps: float,
        rtt_ms: float,
        loss_pct: float = 0.0,
        forwards: list[Forward],
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        slow_start_after_idle: bool = True,
    ) -> None:
        a, b = sites
        if a == b:
            raise ValueError(f"a link joins two different sites, got {a} and {b}")
        for f in forwards:
            if f.src not in sites:
                raise ValueError(f"forward {f}: site {f.src!r} is not one of {a}, {b}")
        self.sites = sites
        self.forwards = forwards
        tcp = {"window_bytes": window_bytes, "slow_start_after_idle": slow_start_after_idle}
        self._directions = {
            (a, b): Direction(a, b, gbps, rtt_ms / 2, loss_pct, **tcp),
            (b, a): Direction(b, a, gbps, rtt_ms / 2, loss_pct, **tcp),
        }
        self.refusing = False  # a reset partition refuses new connections
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        self.connections_total = 0
        self._meter = _Meter(list(self._directions.values()))

    def other(self, site: str) -> str:
        """The site at the far end from ``site``."""
        return self.sites[1] if site == self.sites[0] else self.sites[0]

    def direction(self, src: str, dst: str) -> Direction:
        """The ``src`` -> ``dst`` direction."""
        return self._directions[(src, dst)]

    def start(self) -> LinkRelay:
        """Bind every listener (OSError if a port is taken), then accept in background threads."""
        try:
            for f in self.forwards:
                s = socket.create_server(f.listen, backlog=128, reuse_port=False)
                self._listeners.append(s)
        except OSError:
            self.stop()
            raise
        for s, f in zip(self._listeners, self.forwards, strict=True):
            t = threading.Thread(target=self._accept, args=(s, f), name=f"accept {f}", daemon=True)
            t.start()
            self._threads.append(t)
        meter = threading.Thread(target=self._meter.run, name="link meter", daemon=True)
        meter.start()
        self._threads.append(meter)
        return self

    def stop(self) -> None:
        """Close the listeners and end every connection (idempotent)."""
        for s in self._listeners:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._listeners.clear()
        self._meter.stop.set()
        for conn in self._live():
            conn.end("relay stopped")
        for t in self._threads:
            t.join(timeout=2.0)

    def configure(
        self,
        *,
        gbps: float | None = None,
        rtt_ms: float | None = None,
        loss_pct: float | None = None,
        slow_start_after_idle: bool | None = None,
        up: bool | None = None,
        reset: bool = False,
        src: str | None = None,
    ) -> None:
        """Change the link (both directions, or only the one leaving ``src``); ``up=False`` partitions it."""
        directions = [self.direction(src, self.other(src))] if src else list(self._directions.values())
        for d in directions:
            d.configure(
                gbps=gbps,
                delay_ms=None if rtt_ms is None else rtt_ms / 2,
                loss_pct=loss_pct,
                slow_start_after_idle=slow_start_after_idle,
            )
        if up is not None:
            self.refusing = not up and reset
            for d in self._directions.values():
                d.set_up(up)
            if not up and reset:
                for conn in self._live():
                    conn.end("link reset", reset=True)

    def figures(self) -> dict:
        """Sites, directions (settings, bytes, live goodput and use, open connections), connections, forwards: JSON."""
        live = self._live()
        directions = []
        for d, gbps in zip(self._directions.values(), self._meter.goodput_gbps(), strict=True):
            directions.append(
                d.figures()
                | {
                    "goodput_gbps": gbps,
                    "utilization": None if math.isinf(d.gbps) else gbps / d.gbps,
                    "connections": sum(1 for conn in live if conn.forward.src == d.src),
                }
            )
        return {
            "sites": list(self.sites),
            "directions": directions,
            "partition": None
            if all(d.up for d in self._directions.values())
            else ("reset" if self.refusing else "blackhole"),
            "connections": len(live),
            "connections_total": self.connections_total,
            "forwards": [str(f) for f in self.forwards],
        }

    def forget(self, conn: Connection) -> None:
        """Drop a finished connection."""
        with self._lock:
            self._connections.discard(conn)

    def _live(self) -> list[Connection]:
        with self._lock:
            return list(self._connections)

    def _accept(self, listener: socket.socket, forward: Forward) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # listener closed
            if self.refusing:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            out = self.direction(forward.src, self.other(forward.src))
            conn = Connection(client, forward, out, self.direction(out.dst, out.src), on_close=self.forget)
            with self._lock:
                self._connections.add(conn)
                self.connections_total += 1
            threading.Thread(target=conn.run, name=f"conn {forward}", daemon=True).start()
