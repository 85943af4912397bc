"""A user-space WAN link between two sites: bandwidth, one-way delay, loss and partitions over TCP.

There is no kernel traffic shaping here, so every TCP connection that crosses a link goes through
a relay: a client at site A connects to a listener of the A->B forward, the relay connects to the
target at site B, and moves the bytes of each direction through that direction of the link.

- **Bandwidth**: one virtual clock per direction, shared by every connection of that direction
  (the capacity of a real link). A chunk leaves when the clock says the bytes before it have been
  serialised; the reader waits for it, so a full link pushes back on the sender's TCP window.
- **Delay**: each chunk is delivered ``delay`` after it left (half the RTT per direction), in
  order: one FIFO per connection and direction, so nothing is ever reordered, even when the delay
  is lowered at run time.
- **Loss**: bytes cannot be dropped inside a TCP stream, so loss is emulated by what it does to
  TCP: a chunk that contains a lost segment (each 1,448-byte segment lost with probability p)
  arrives one RTT late (a fast retransmit, with the head-of-line blocking that follows), and each
  connection is held to the Mathis et al. rate ``MSS * 1.22 / (RTT * sqrt(p))`` (RTT at least 1 ms).
- **Partition**: ``blackhole`` (the default) stops every byte in both directions, as a real cut
  does: connections stay open and silent, new ones are accepted but not carried, and the
  endpoints notice only through their own deadlines and pings (the lab's NATS servers ping every
  second); when the link returns, held data flows on. ``reset`` ends every connection at once
  (FIN, then RST) and refuses new ones, like a restarted middlebox.

Bytes move with ``os.splice`` (socket -> pipe -> socket, never through Python), with blocking
sockets and a reader and a writer thread per connection and direction; the pipes are the delay
line, each holds one chunk of at most 1 MiB (32 per connection and direction: 32 MiB in flight,
25 ms one way at 10 Gbps; a longer delay at that rate is window-bound, as real TCP would be).
Measured here: 1 MiB chunks cost about 0.32 CPU-s per GB at 10 Gbps against about 0.45 for
256 KiB, and one asyncio loop driving every connection (non-blocking splices, timers) cost more
than the threads. Unprivileged users get 1 MiB pipes within their pipe budget
(``/proc/sys/fs/pipe-user-pages-soft``); beyond it pipes are smaller and chunks follow. Linux only.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import queue
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

MSS_BYTES = 1448
_PIPE_BYTES = 1024 * 1024
_MAX_PIPES = 32  # per connection and direction: 32 MiB in flight
_F_SETPIPE_SZ = 1031
_BURST_S = 0.005  # credit a direction may bank: absorbs the relay's own scheduling stalls on a busy machine
_CHUNK_S = 0.002  # below the pipe size, read what the link moves in this long (smooth pacing at low rates)
_MIN_CHUNK = 16 * 1024
_POLL_S = 0.05  # how often blocked waits look at a closed connection or a stopped relay
_MIN_SLEEP_S = 50e-6
_CONNECT_TIMEOUT_S = 5.0


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
    """One direction of a link: a bandwidth all its connections share, a one-way delay, loss, up or down."""

    def __init__(self, src: str, dst: str, gbps: float, delay_ms: float, loss_pct: float) -> None:
        self.src, self.dst = src, dst
        self.gbps, self.delay_ms, self.loss_pct = gbps, delay_ms, loss_pct
        self.up = True
        self._finished_bytes = 0  # delivered by connections that have ended
        self._pumps: set[_Pump] = set()
        self._clock = 0.0  # when the last reserved byte has been serialised (time.monotonic)
        self._cond = threading.Condition(threading.Lock())

    def configure(self, *, gbps: float | None = None, delay_ms: float | None = None, loss_pct: float | None = None) -> None:
        """Change some figures; chunks already in flight keep the delay they were given."""
        with self._cond:
            if gbps is not None:
                self.gbps = gbps
            if delay_ms is not None:
                self.delay_ms = delay_ms
            if loss_pct is not None:
                self.loss_pct = loss_pct

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

    def reserve(self, nbytes: int) -> float:
        """When the last of ``nbytes`` read now has crossed the link's bandwidth (time.monotonic)."""
        with self._cond:
            now = time.monotonic()
            if math.isinf(self.gbps):
                return now
            self._clock = max(self._clock, now - _BURST_S) + nbytes * 8 / (self.gbps * 1e9)
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
            return _PIPE_BYTES
        return max(_MIN_CHUNK, min(_PIPE_BYTES, int(rate_bps / 8 * _CHUNK_S)))

    def retransmit_delay_s(self, nbytes: int, rng: random.Random) -> float:
        """One RTT if a segment of this chunk is lost (sampled), else 0."""
        p = self.loss_pct / 100
        if p <= 0 or rng.random() >= 1 - (1 - p) ** (nbytes / MSS_BYTES):
            return 0.0
        return max(2 * self.delay_ms, 1.0) / 1000

    def attach(self, pump: _Pump) -> None:
        """Count ``pump``'s bytes in this direction."""
        with self._cond:
            self._pumps.add(pump)

    def detach(self, pump: _Pump) -> None:
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
                "up": self.up,
                "bytes": delivered,
            }


class _Pump:
    """One direction of one connection: reader (splice in, pace, stamp) and writer (wait, splice out)."""

    def __init__(self, conn: _Connection, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
        self.conn, self.src, self.dst, self.direction = conn, src, dst, direction
        self.bytes = 0  # delivered (only the writer thread adds)
        self._free: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._pipes: list[tuple[int, int]] = []
        self._line: queue.SimpleQueue[tuple[tuple[int, int] | None, int, float]] = queue.SimpleQueue()
        self._own_clock = 0.0
        self._rng = random.Random()

    def read(self) -> None:
        """Move chunks from the source socket into the delay line until EOF or an error."""
        closed = self.conn.closed
        try:
            while not closed.is_set():
                pipe = self._take_pipe()
                if pipe is None:
                    return
                n = os.splice(self.src.fileno(), pipe[1], self.direction.chunk_bytes())
                if n == 0:
                    self._free.put(pipe)
                    self._line.put((None, 0, 0.0))
                    return
                if not self.direction.wait_up(closed):
                    return
                sent = self._pace(n)
                if sent is None:
                    return
                lag_s = self.direction.delay_ms / 1000 + self.direction.retransmit_delay_s(n, self._rng)
                self._line.put((pipe, n, sent + lag_s))
        except OSError as e:
            self.conn.end(f"read from {self.direction.src} side: {e}")

    def write(self) -> None:
        """Deliver chunks in order once their time has come; half-close the far side at EOF."""
        closed = self.conn.closed
        try:
            while True:
                try:
                    pipe, n, deliver_at = self._line.get(timeout=_POLL_S)
                except queue.Empty:
                    if closed.is_set():
                        return
                    continue
                if pipe is None:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                if not _sleep_until(deliver_at, closed) or not self.direction.wait_up(closed):
                    return
                left = n
                while left:
                    left -= os.splice(pipe[0], self.dst.fileno(), left)
                self.bytes += n
                self._free.put(pipe)
        except OSError as e:
            self.conn.end(f"write to {self.direction.dst} side: {e}")

    def close_pipes(self) -> None:
        """Close every pipe (after both threads are done)."""
        for r, w in self._pipes:
            os.close(r)
            os.close(w)
        self._pipes.clear()

    def _pace(self, n: int) -> float | None:
        """Sleep until the chunk has crossed the per-connection (loss) and the shared bandwidth."""
        closed = self.conn.closed
        mathis = self.direction.mathis_bps()
        if not math.isinf(mathis):
            self._own_clock = max(self._own_clock, time.monotonic() - _BURST_S) + n * 8 / mathis
            if not _sleep_until(self._own_clock, closed):
                return None
        sent = self.direction.reserve(n)
        return sent if _sleep_until(sent, closed) else None

    def _take_pipe(self) -> tuple[int, int] | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if len(self._pipes) < _MAX_PIPES:
            pipe = os.pipe2(os.O_CLOEXEC)
            try:
                fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass  # unprivileged and over the per-user pipe budget: smaller pipes, smaller chunks
            self._pipes.append(pipe)
            return pipe
        while not self.conn.closed.is_set():  # the delay line is full: wait for the writer
            try:
                return self._free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None


def _sleep_until(deadline: float, closed: threading.Event) -> bool:
    """Sleep until ``deadline`` (time.monotonic), waking to look at ``closed``; False if it was set."""
    while True:
        left = deadline - time.monotonic()
        if left < _MIN_SLEEP_S:  # the virtual clocks absorb the error of not sleeping this little
            return not closed.is_set()
        if closed.is_set():
            return False
        time.sleep(min(left, _POLL_S))


class _Connection:
    """One client connection carried across the link (four threads: a reader and a writer per direction)."""

    def __init__(self, relay: LinkRelay, client: socket.socket, forward: Forward) -> None:
        self.relay, self.client, self.forward = relay, client, forward
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        """Connect to the target once the link carries traffic, then pump both ways until both ends close."""
        out = self.relay.direction(self.forward.src, self.relay.other(self.forward.src))
        back = self.relay.direction(self.relay.other(self.forward.src), self.forward.src)
        try:
            if not out.wait_up(self.closed):
                return
            try:
                self.upstream = socket.create_connection(self.forward.target, timeout=_CONNECT_TIMEOUT_S)
            except OSError as e:
                log.info("forward %s: cannot reach the target: %s", self.forward, e)
                self.end("target unreachable", reset=True)
                return
            self.upstream.settimeout(None)
            for s in (self.client, self.upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pumps = [_Pump(self, self.client, self.upstream, out), _Pump(self, self.upstream, self.client, back)]
            for p in pumps:
                p.direction.attach(p)
            threads = [threading.Thread(target=f, daemon=True) for p in pumps for f in (p.read, p.write)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for p in pumps:
                p.direction.detach(p)
                p.close_pipes()
        finally:
            self.end("done")
            for s in (self.client, self.upstream):
                if s is not None:
                    s.close()
            self.relay.forget(self)

    def end(self, why: str, *, reset: bool = False) -> None:
        """Stop both directions now (idempotent); ``reset`` makes the close an RST."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        log.debug("connection via %s ends: %s", self.forward, why)
        for s in (self.client, self.upstream):
            if s is None:
                continue
            try:
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class LinkRelay:
    """Both directions of the link between two sites, and the forwards that cross it."""

    def __init__(
        self, sites: tuple[str, str], *, gbps: float, rtt_ms: float, loss_pct: float = 0.0, forwards: list[Forward]
    ) -> None:
        a, b = sites
        if a == b:
            raise ValueError(f"a link joins two different sites, got {a} and {b}")
        for f in forwards:
            if f.src not in sites:
                raise ValueError(f"forward {f}: site {f.src!r} is not one of {a}, {b}")
        self.sites = sites
        self.forwards = forwards
        self._directions = {
            (a, b): Direction(a, b, gbps, rtt_ms / 2, loss_pct),
            (b, a): Direction(b, a, gbps, rtt_ms / 2, loss_pct),
        }
        self.refusing = False  # a reset partition refuses new connections
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self.connections_total = 0

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
        up: bool | None = None,
        reset: bool = False,
        src: str | None = None,
    ) -> None:
        """Change the link (both directions, or only the one leaving ``src``); ``up=False`` partitions it."""
        directions = [self.direction(src, self.other(src))] if src else list(self._directions.values())
        for d in directions:
            d.configure(gbps=gbps, delay_ms=None if rtt_ms is None else rtt_ms / 2, loss_pct=loss_pct)
        if up is not None:
            self.refusing = not up and reset
            for d in self._directions.values():
                d.set_up(up)
            if not up and reset:
                for conn in self._live():
                    conn.end("link reset", reset=True)

    def figures(self) -> dict:
        """Sites, directions (settings and bytes), connections, forwards: JSON-ready."""
        return {
            "sites": list(self.sites),
            "directions": [d.figures() for d in self._directions.values()],
            "partition": None if all(d.up for d in self._directions.values()) else ("reset" if self.refusing else "blackhole"),
            "connections": len(self._live()),
            "connections_total": self.connections_total,
            "forwards": [str(f) for f in self.forwards],
        }

    def forget(self, conn: _Connection) -> None:
        """Drop a finished connection."""
        with self._lock:
            self._connections.discard(conn)

    def _live(self) -> list[_Connection]:
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
            conn = _Connection(self, client, forward)
            with self._lock:
                self._connections.add(conn)
                self.connections_total += 1
            threading.Thread(target=conn.run, name=f"conn {forward}", daemon=True).start()
