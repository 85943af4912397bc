"""Moving one connection's bytes across a link: a reader and a writer thread per direction, pipes as the delay line."""

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
from typing import TYPE_CHECKING

from libs.lab.wan_link import BURST_S, PIPE_BYTES, Direction, Forward

if TYPE_CHECKING:
    from libs.lab.wan import LinkRelay

log = logging.getLogger(__name__)

_MAX_PIPES = 32  # per connection and direction: 32 MiB in flight
_F_SETPIPE_SZ = 1031
_POLL_S = 0.05  # how often blocked waits look at a closed connection or a stopped relay
_MIN_SLEEP_S = 50e-6
_CONNECT_TIMEOUT_S = 5.0


class Pump:
    """One direction of one connection: reader (splice in, pace, stamp) and writer (wait, splice out)."""

    def __init__(self, conn: Connection, src: socket.socket, dst: socket.socket, direction: Direction) -> None:
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
            self._own_clock = max(self._own_clock, time.monotonic() - BURST_S) + n * 8 / mathis
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
            pumps = [Pump(self, self.client, self.upstream, out), Pump(self, self.upstream, self.client, back)]
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
