"""Direct-TCP connections kept open per destination (host, port): claimed by a transfer, returned, kept warm.

A transfer claims its stripes for its duration (idle pooled ones first, new ones connected at once
for the rest) and returns them once the receiver verified everything and every acknowledgement came
back; a failed transfer closes its stripes instead. Each connection has a writer thread (frames and
chunks from its queue, in order) and a reader thread (receiver frames, handed to whoever holds the
connection; a frame that arrives while nobody does is dropped). A writer with nothing to send for
``keepalive_s`` sends a 4-byte keepalive frame, so a path that restarts slow start after an idle RTO
(RTT + 200 ms, Linux's ``tcp_slow_start_after_idle``) never sees the connection idle; a connection
nobody claimed for ``pool_idle_s`` is closed by its writer. A connection whose peer goes away
(reset, close, a failed write) is closed and leaves the pool; the transfer holding it learns it from
``on_broken``. With ``TcpConfig.tls`` (``pki.client_context``) every new connection completes a TLS
handshake before it is handed out, all of a claim's at once (one round trip for all of them), and
the receiver's certificate must be signed by the CA and name the host dialled; a warm connection
pays neither the connect nor the handshake again. Threading: ``claim`` on the event loop; the rest
from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import queue
import selectors
import socket
import threading
import time
from typing import TYPE_CHECKING, Protocol

from libs.common.errors import PrfaasError
from libs.common.messages import kv_receiver_frame_decoder
from libs.kvwire.format import FRAME_PREFIX
from libs.kvwire.sockets import KEEPALIVE, Closed, Stream, TlsStream, handshake, read_frame, set_deadline

if TYPE_CHECKING:
    from libs.kvwire.tcp_send import TcpConfig

Endpoint = tuple[str, int]


class Holder(Protocol):
    """Whoever holds a connection: told of its frames and of its end (called from the connection's threads)."""

    def on_frame(self, conn: PooledConnection, msg: object) -> None:
        """A receiver frame arrived."""

    def on_broken(self, conn: PooledConnection, exc: BaseException) -> None:
        """The connection failed (it is being closed)."""


class Outgoing(Protocol):
    """Something a writer thread sends besides plain frames (a paced chunk)."""

    def write(self, sock: Stream, stopping: threading.Event) -> bool:
        """Send it on ``sock``; False if ``stopping`` was set first."""


class PooledConnection:
    """One connection to a receiver, its writer and reader threads, and the transfers it carried."""

    def __init__(self, sock: Stream, endpoint: Endpoint, pool: ConnectionPool) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.holder: Holder | None = None
        self.transfers = 0  # claims so far; the current one reuses the connection when it was claimed before
        self.idle_since = time.monotonic()
        self.stopping = threading.Event()
        self._pool = pool
        self._queue: queue.SimpleQueue[bytes | Outgoing | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read_loop, name="kv-tcp-read", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="kv-tcp-write", daemon=True)

    @property
    def reused(self) -> bool:
        """The connection carried a transfer before the current one."""
        return self.transfers > 1

    def start(self) -> None:
        """Start both threads."""
        self._reader.start()
        self._writer.start()

    def send(self, item: bytes | Outgoing) -> None:
        """Queue a frame or a chunk behind what is queued already."""
        self._queue.put(item)

    def close(self) -> None:
        """Stop both threads and unblock their socket calls; the writer closes the socket (idempotent)."""
        self.stopping.set()
        self._queue.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def join(self) -> None:
        """Wait until the socket is closed (blocking: call it in a worker thread)."""
        self._writer.join()

    def _broken(self, exc: BaseException) -> None:
        if self.stopping.is_set():
            return
        holder = self.holder
        self.close()
        if holder is not None:
            holder.on_broken(self, exc)

    def _wait_s(self) -> float | None:
        """How long the writer may wait for its next item before it has something to do."""
        keepalive_s = self._pool.config.keepalive_s
        if keepalive_s > 0:
            return keepalive_s
        if self.holder is None:
            return max(0.001, self.idle_since + self._pool.config.pool_idle_s - time.monotonic())
        return None

    def _write_loop(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self._wait_s())
                except queue.Empty:
                    if self._pool.expire(self):
                        return
                    if self._pool.config.keepalive_s > 0:
                        self.sock.sendall(KEEPALIVE)
                    continue
                if item is None or self.stopping.is_set():
                    return
                if isinstance(item, bytes):
                    self.sock.sendall(item)
                elif not item.write(self.sock, self.stopping):
                    return
        except OSError as e:
            self._broken(e)
        finally:
            self.close()
            self._reader.join()
            self.sock.close()
            self._pool.forget(self)

    def _read_loop(self) -> None:
        prefix = bytearray(FRAME_PREFIX.size)
        while not self.stopping.is_set():
            try:
                msg = read_frame(self.sock, prefix, kv_receiver_frame_decoder)
            except TimeoutError:
                continue  # idle between frames; deadlines are the holder's
            except (OSError, Closed, PrfaasError) as e:
                self._broken(e)
                return
            holder = self.holder
            if msg is not None and holder is not None:
                holder.on_frame(self, msg)


class ConnectionPool:
    """Connections to receivers, per endpoint: the idle ones wait for the next transfer (``config.pool``)."""

    def __init__(self, config: TcpConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._idle: dict[Endpoint, list[PooledConnection]] = {}
        self._open: set[PooledConnection] = set()
        self._closed = False

    @property
    def open_connections(self) -> int:
        """Connections open now, held or idle."""
        with self._lock:
            return len(self._open)

    async def claim(self, endpoint: Endpoint, count: int, holder: Holder) -> list[PooledConnection]:
        """``count`` connections to ``endpoint`` held by ``holder``: idle ones first, the rest new (``OSError``)."""
        with self._lock:
            idle = self._idle.get(endpoint, [])
            conns = [idle.pop() for _ in range(min(count, len(idle)))]
            for conn in conns:
                conn.holder = holder
        try:
            socks = await asyncio.to_thread(self.connect, endpoint, count - len(conns)) if len(conns) < count else []
        except BaseException:
            self.release(conns)
            raise
        for sock in socks:
            conn = PooledConnection(sock, endpoint, self)
            conn.holder = holder
            with self._lock:
                self._open.add(conn)
            conn.start()
            conns.append(conn)
        for conn in conns:
            conn.transfers += 1
        return conns

    def release(self, conns: list[PooledConnection]) -> None:
        """Give back connections whose transfer ended clean: idle in the pool, or closed when not pooling."""
        for conn in conns:
            with self._lock:
                keep = self.config.pool and not self._closed and not conn.stopping.is_set()
                conn.holder = None
                if keep:
                    conn.idle_since = time.monotonic()
                    self._idle.setdefault(conn.endpoint, []).append(conn)
            if not keep:
                conn.close()

    def flush(self, endpoint: Endpoint) -> None:
        """Close the idle connections to ``endpoint`` (one of them was found dead: the others may be too)."""
        with self._lock:
            idle = self._idle.pop(endpoint, [])
        for conn in idle:
            conn.close()

    def expire(self, conn: PooledConnection) -> bool:
        """Take ``conn`` out of the pool if nobody claimed it for ``pool_idle_s`` (its writer then closes it)."""
        with self._lock:
            idle = self._idle.get(conn.endpoint, [])
            if conn not in idle or time.monotonic() - conn.idle_since < self.config.pool_idle_s:
                return False
            idle.remove(conn)
            return True

    def forget(self, conn: PooledConnection) -> None:
        """A connection closed: out of the pool."""
        with self._lock:
            self._open.discard(conn)
            idle = self._idle.get(conn.endpoint, [])
            if conn in idle:
                idle.remove(conn)

    async def close(self) -> None:
        """Close every connection, idle or held, and wait for their threads (idempotent)."""
        with self._lock:
            self._closed = True
            conns = list(self._open)
            self._idle.clear()
        for conn in conns:
            conn.close()
        for conn in conns:
            await asyncio.to_thread(conn.join)

    def connect(self, endpoint: Endpoint, count: int) -> list[Stream]:
        """``count`` new connections (TLS ones when configured), their handshakes in flight at once (blocking)."""
        host, port = endpoint
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        socks: list[socket.socket] = []
        try:
            started = time.monotonic()
            for _ in range(count):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setblocking(False)
                if sock.connect_ex(address) not in (0, errno.EINPROGRESS):
                    raise ConnectionRefusedError(f"connect to {host}:{port} failed")
            self._await_connected(socks, endpoint)
            for sock in socks:
                set_deadline(sock, self.config.io_timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.config.tls is None:
                return list(socks)
            streams = [TlsStream(sock, self.config.tls, server_hostname=host) for sock in socks]
            handshake(streams, max(0.0, started + self.config.connect_timeout_s - time.monotonic()))
            return list(streams)
        except BaseException:
            for sock in socks:
                sock.close()
            raise

    def _await_connected(self, socks: list[socket.socket], endpoint: Endpoint) -> None:
        timeout_s = self.config.connect_timeout_s
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            for sock in socks:
                selector.register(sock, selectors.EVENT_WRITE)
            pending = len(socks)
            while pending:
                events = selector.select(max(0.0, deadline - time.monotonic()))
                if not events:
                    raise TimeoutError(f"connect to {endpoint[0]}:{endpoint[1]}: no answer in {timeout_s:.0f}s")
                for key, _ in events:
                    error = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if error:
                        raise OSError(error, f"connect to {endpoint[0]}:{endpoint[1]}: {os.strerror(error)}")
                    selector.unregister(key.fileobj)
                    pending -= 1
