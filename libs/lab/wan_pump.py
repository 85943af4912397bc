"""Moving one connection's bytes across a link: a reader and a writer thread per direction, pipes as the delay line.

A connection behaves like TCP over the path: its handshake costs one round trip before a byte
moves, and each direction sends only what its congestion window (:mod:`libs.lab.wan_cwnd`) allows.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import queue
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from libs.lab.wan_cwnd import CongestionWindow, rto_s
from libs.lab.wan_link import BURST_S, MSS_BYTES, PIPE_BYTES, Direction, Forward

log = logging.getLogger(__name__)

_MAX_PIPES = 32  # per connection and direction: chunks on their way (the one-way part of what is in flight)
_F_SETPIPE_SZ = 1031
_POLL_S = 0.05  # how often blocked waits look at a closed connection or a stopped relay
_MIN_SLEEP_S = 50e-6
_CONNECT_TIMEOUT_S = 5.0


class Pump:
    """One direction of one connection: reader (data, window, splice in, pace, stamp) and writer (wait, splice out, ack)."""

    def __init__(
        self,
        conn: Connection,
        src: socket.socket,
        dst: socket.socket,
        direction: Direction,
        ack_direction: Direction,
        *,
        start_at: float,
    ) -> None:
        self.conn, self.src, self.dst, self.direction = conn, src, dst, direction
        self.ack_direction = ack_direction  # the way acknowledgements come back
        self.start_at = start_at  # no byte leaves before the handshake allows (time.monotonic)
        self.window = CongestionWindow(direction.window_bytes)
        self.bytes = 0  # delivered (only the writer thread adds)
        self._free: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
        self._pipes: list[tuple[int, int]] = []
        self._line: queue.SimpleQueue[tuple[tuple[int, int] | None, int, float]] = queue.SimpleQueue()
        self._own_clock = 0.0
        self._last_ack_at = 0.0
        self._readable = select.poll()
        self._readable.register(src.fileno(), select.POLLIN)
        self._rng = random.Random()

    def read(self) -> None:
        """Move chunks the window allows from the source socket into the delay line until EOF or an error."""
        closed = self.conn.closed
        try:
            if not _sleep_until(self.start_at, closed):
                return
            while not closed.is_set():
                waiting = bool(self._readable.poll(0))  # else the sender was idle: no credit on the link
                if not waiting:
                    self._readable.poll()  # a byte to send (or EOF, or an error): only now may idle restart the window
                room = self._room()
                pipe = None if room is None else self._take_pipe()
                if pipe is None:
                    return
                n = os.splice(self.src.fileno(), pipe[1], min(room, self._chunk_bytes()))
                if n == 0:
                    self._free.put(pipe)
                    self._line.put((None, 0, 0.0))
                    return
                self.window.sent(n, time.monotonic())
                if not self.direction.wait_up(closed):
                    return
                sent = self._pace(n, credit=waiting)
                if sent is None:
                    return
                lag_s = self.direction.delay_ms / 1000 + self.direction.retransmit_delay_s(n, self._rng)
                self._line.put((pipe, n, sent + lag_s))
        except OSError as e:
            self.conn.end(f"read from {self.direction.src} side: {e}")

    def write(self) -> None:
        """Deliver chunks in order once their time has come, then post their acknowledgement; half-close at EOF."""
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
                # From the scheduled delivery: the relay's own lateness is not the path's; a receiver
                # that held the chunk up longer (its window was full) delays the acknowledgement.
                delivered = time.monotonic()
                delivered = deliver_at if delivered - deliver_at <= BURST_S else delivered
                self._last_ack_at = max(self._last_ack_at, delivered + self.ack_direction.delay_ms / 1000)
                self.window.acknowledge(n, self._last_ack_at)
        except OSError as e:
            self.conn.end(f"write to {self.direction.dst} side: {e}")

    def close_pipes(self) -> None:
        """Close every pipe (after both threads are done)."""
        for r, w in self._pipes:
            os.close(r)
            os.close(w)
        self._pipes.clear()

    def _chunk_bytes(self) -> int:
        """The direction's chunk, at most an eighth of the window: a round's first acknowledgement is not held back long."""
        return min(self.direction.chunk_bytes(), max(MSS_BYTES, self.window.cwnd_bytes // 8))

    def _room(self) -> int | None:
        """Bytes the window lets this direction send now, waiting for acknowledgements if none; None once closed."""
        w, closed = self.window, self.conn.closed
        w.collect(time.monotonic())
        if self.direction.slow_start_after_idle:
            w.restart_if_idle(time.monotonic(), rto_s((self.direction.delay_ms + self.ack_direction.delay_ms) / 1000))
        while not (room := w.room()):
            due = w.next_ack_at(_POLL_S)
            if closed.is_set() or (due is not None and not _sleep_until(due, closed)):
                return None
            w.collect(time.monotonic())
        return room

    def _pace(self, n: int, *, credit: bool) -> float | None:
        """Sleep until the chunk has crossed the per-connection (loss) and the shared bandwidth."""
        closed = self.conn.closed
        mathis = self.direction.mathis_bps()
        if not math.isinf(mathis):
            self._own_clock = max(self._own_clock, time.monotonic() - BURST_S) + n * 8 / mathis
            if not _sleep_until(self._own_clock, closed):
                return None
        sent = self.direction.reserve(n, credit=credit)
        return sent if _sleep_until(sent, closed) else None

    def _take_pipe(self) -> tuple[int, int] | None:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if len(self._pipes) < _MAX_PIPES:
            pipe = os.pipe2(os.O_CLOEXEC)
            try:
                fcntl.fcntl(pipe[1], _F_SETPIPE_SZ, PIPE_BYTES)
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


class Connection:
    """One client connection carried across a link's two directions (four threads: a reader and a writer per direction)."""

    def __init__(
        self,
        client: socket.socket,
        forward: Forward,
        out: Direction,
        back: Direction,
        *,
        on_close: Callable[[Connection], None],
    ) -> None:
        self.client, self.forward, self.out, self.back = client, forward, out, back
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
        self._on_close = on_close
        self._lock = threading.Lock()

    def run(self) -> None:
        """Open the far side as a TCP handshake would, then pump both ways until both ends close."""
        try:
            if not self.out.wait_up(self.closed):
                return
            opened = time.monotonic()
            out_s, back_s = self.out.delay_ms / 1000, self.back.delay_ms / 1000
            if not _sleep_until(opened + out_s, self.closed):  # the SYN reaches the far site
                return
            try:
                self.upstream = socket.create_connection(self.forward.target, timeout=_CONNECT_TIMEOUT_S)
            except OSError as e:
                log.info("forward %s: cannot reach the target: %s", self.forward, e)
                if _sleep_until(opened + out_s + back_s, self.closed):  # the refusal travels back
                    self.end("target unreachable", reset=True)
                return
            if self.closed.is_set():  # ended while connecting: end() may have missed the new socket
                return
            self.upstream.settimeout(None)
            for s in (self.client, self.upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pumps = [  # the client sends once the SYN-ACK is back; the target once the client's ACK reached it
                Pump(self, self.client, self.upstream, self.out, self.back, start_at=opened + out_s + back_s),
                Pump(self, self.upstream, self.client, self.back, self.out, start_at=opened + 2 * out_s + back_s),
            ]
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
            self._on_close(self)

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
