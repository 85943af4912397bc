"""Direct TCP, prefill side: N parallel connections per transfer, chunks striped across them.

Each connection has a writer thread (pace, then ``sendmsg`` of header and payload memoryview:
no copy) and a reader thread (acks). The event loop keeps the books: the chunks in flight, a
window of unacknowledged bytes, resends of chunks the receiver rejected, RTT samples from acks.
A broken or stalled connection breaks the session (``TransportBroken``); the sender reopens it
and the receiver's resume state says what not to send again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from libs.common.errors import BadRequest, PrfaasError, TransferFailed, error_from_code
from libs.common.messages import (
    ErrorReply,
    KvAbort,
    KvBegin,
    KvChunkAck,
    KvEnd,
    KvJoin,
    KvManifest,
    KvResumeState,
    encode,
    kv_receiver_frame_decoder,
)
from libs.kvwire.format import DEFAULT_CHUNK_BYTES, FRAME_PREFIX, frame, held_map
from libs.kvwire.link import Link
from libs.kvwire.sender import Destination, MissingChunks, OutChunk, TransportBroken
from libs.kvwire.sockets import Closed, read_frame, send_all, set_deadline, tcp_retransmits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TcpConfig:
    """Connections, chunking, window and deadlines of direct TCP transfers."""

    connections: int = 4
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    window_bytes: int = 64 << 20  # unacknowledged bytes per transfer
    connect_timeout_s: float = 5.0
    io_timeout_s: float = 30.0  # a send, an ack or a reply slower than this breaks the session
    max_chunk_attempts: int = 5  # a chunk rejected this often fails the transfer
    max_end_rounds: int = 3


class _Flight:
    """A chunk sent and not yet acknowledged."""

    __slots__ = ("chunk", "attempt", "sent_at")

    def __init__(self, chunk: OutChunk, attempt: int) -> None:
        self.chunk = chunk
        self.attempt = attempt
        self.sent_at = 0.0  # set by the writer thread once the bytes are in the socket


def _error(reply: ErrorReply) -> PrfaasError:
    return error_from_code(reply.code, reply.message)


class TcpTransport:
    """Sends transfers to ``TcpReceiverServer``s (a destination's ``host``/``port``)."""

    def __init__(self, config: TcpConfig | None = None) -> None:
        self.config = config or TcpConfig()
        self.chunk_bytes = self.config.chunk_bytes

    async def open(self, manifest: KvManifest, dest: Destination, link: Link) -> _TcpSession:
        """Connect, begin (or resume) the transfer, join the other connections and start their threads."""
        socks, state = await asyncio.to_thread(self._handshake, manifest, dest)
        session = _TcpSession(manifest, link, self.config, socks, state, asyncio.get_running_loop())
        session.start()
        return session

    async def abort(self, transfer_id: str, dest: Destination, reason: str) -> None:
        """Tell the receiver at ``dest`` to drop ``transfer_id``."""
        await asyncio.to_thread(self._abort, transfer_id, dest, reason)

    def _connect(self, dest: Destination) -> socket.socket:
        sock = socket.create_connection((dest.host, dest.port), timeout=self.config.connect_timeout_s)
        set_deadline(sock, self.config.io_timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _connect_all(self, dest: Destination) -> list[socket.socket]:
        """Every connection of a transfer, their handshakes in flight at once (one round trip, not one each)."""
        family, kind, proto, _, address = socket.getaddrinfo(dest.host, dest.port, type=socket.SOCK_STREAM)[0]
        socks: list[socket.socket] = []
        try:
            for _ in range(self.config.connections):
                sock = socket.socket(family, kind, proto)
                socks.append(sock)
                sock.setblocking(False)
                if sock.connect_ex(address) not in (0, errno.EINPROGRESS):
                    raise ConnectionRefusedError(f"connect to {dest.host}:{dest.port} failed")
            deadline = time.monotonic() + self.config.connect_timeout_s
            with selectors.DefaultSelector() as selector:
                for sock in socks:
                    selector.register(sock, selectors.EVENT_WRITE)
                pending = len(socks)
                while pending:
                    events = selector.select(max(0.0, deadline - time.monotonic()))
                    if not events:
                        raise TimeoutError(
                            f"connect to {dest.host}:{dest.port}: no answer in {self.config.connect_timeout_s:.0f}s"
                        )
                    for key, _ in events:
                        error = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if error:
                            raise OSError(error, f"connect to {dest.host}:{dest.port}: {os.strerror(error)}")
                        selector.unregister(key.fileobj)
                        pending -= 1
            for sock in socks:
                set_deadline(sock, self.config.io_timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return socks
        except BaseException:
            for sock in socks:
                sock.close()
            raise

    def _reply(self, sock: socket.socket) -> KvResumeState:
        reply = read_frame(sock, bytearray(FRAME_PREFIX.size), kv_receiver_frame_decoder)
        if isinstance(reply, ErrorReply):
            raise _error(reply)
        if not isinstance(reply, KvResumeState):
            raise BadRequest(f"unexpected handshake reply {type(reply).__name__}")
        return reply

    def _handshake(self, manifest: KvManifest, dest: Destination) -> tuple[list[socket.socket], KvResumeState]:
        """Connect, begin on the first connection, then join the others all at once."""
        socks: list[socket.socket] = []
        try:
            socks = self._connect_all(dest)
            socks[0].sendall(frame(encode(KvBegin(manifest=manifest))))
            state = self._reply(socks[0])
            if state.complete:
                for sock in socks[1:]:
                    sock.close()
                return socks[:1], state
            for i, sock in enumerate(socks[1:], 1):
                sock.sendall(frame(encode(KvJoin(transfer_id=manifest.transfer_id, conn=i))))
            for sock in socks[1:]:
                self._reply(sock)
            return socks, state
        except (OSError, Closed) as e:
            for sock in socks:
                sock.close()
            raise TransportBroken(
                f"cannot open transfer {manifest.transfer_id} at {dest.host}:{dest.port}: {e!r}"
            ) from e
        except BaseException:
            for sock in socks:
                sock.close()
            raise

    def _abort(self, transfer_id: str, dest: Destination, reason: str) -> None:
        try:
            with self._connect(dest) as sock:
                sock.sendall(frame(encode(KvAbort(transfer_id=transfer_id, reason=reason))))
                sock.recv(1)  # the receiver closes once the transfer is dropped
        except OSError as e:
            raise TransferFailed(f"abort of {transfer_id} not delivered to {dest.host}:{dest.port}: {e!r}") from e


class _Conn:
    """One connection's writer and reader threads."""

    def __init__(self, sock: socket.socket, session: _TcpSession) -> None:
        self.sock = sock
        self.session = session
        self.queue: queue.SimpleQueue[_Flight | bytes | None] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._write_loop, name="kv-tcp-write", daemon=True),
            threading.Thread(target=self._read_loop, name="kv-tcp-read", daemon=True),
        ]

    def _broken(self, exc: BaseException) -> None:
        if not self.stopping.is_set():
            with contextlib.suppress(RuntimeError):  # loop closed
                self.session.loop.call_soon_threadsafe(self.session.on_broken, exc)

    def _write_loop(self) -> None:
        bucket = self.session.link.bucket
        transfer_id = self.session.manifest.transfer_id
        try:
            while True:
                item = self.queue.get()
                if item is None or self.stopping.is_set():
                    return
                if isinstance(item, bytes):
                    self.sock.sendall(item)
                    continue
                # Checksummed here, in parallel with the other connections, just before the socket copies it.
                header = frame(encode(item.chunk.header(transfer_id, item.attempt)))
                payload = item.chunk.payload
                order = self.session.link.order_of(transfer_id)
                if not bucket.wait_blocking(len(header) + len(payload), self.stopping, order):
                    return
                send_all(self.sock, header, payload)
                item.sent_at = time.monotonic()
        except OSError as e:
            self._broken(e)

    def _read_loop(self) -> None:
        prefix = bytearray(FRAME_PREFIX.size)
        while not self.stopping.is_set():
            try:
                msg = read_frame(self.sock, prefix, kv_receiver_frame_decoder)
            except TimeoutError:
                continue  # idle between frames; the session's own deadlines decide
            except (OSError, Closed, PrfaasError) as e:
                self._broken(e)
                return
            with contextlib.suppress(RuntimeError):
                self.session.loop.call_soon_threadsafe(self.session.on_frame, msg)

    def stop(self) -> None:
        """Ask both threads to end and unblock their socket calls."""
        self.stopping.set()
        self.queue.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def join(self) -> None:
        """Wait for both threads (blocking: call it in a worker thread) and close the socket."""
        for thread in self.threads:
            thread.join()
        self.sock.close()


class _TcpSession:
    """One open attempt of a transfer over direct TCP (books kept on the event loop)."""

    def __init__(
        self,
        manifest: KvManifest,
        link: Link,
        config: TcpConfig,
        socks: list[socket.socket],
        state: KvResumeState,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.manifest = manifest
        self.link = link
        self.config = config
        self.loop = loop
        self.held = held_map(state.held)
        self.complete = state.complete
        self.sent_chunks = 0
        self.sent_bytes = 0
        self.resent_chunks = 0
        self._conns = [_Conn(sock, self) for sock in socks]
        self.stripes = len(socks)
        self._retransmits_at_open = [tcp_retransmits(sock) for sock in socks]
        self._flights: dict[tuple[int, int], _Flight] = {}
        self._inflight_bytes = 0
        self._progress = asyncio.Event()
        self._reply: asyncio.Future[KvResumeState] | None = None
        self._failure: BaseException | None = None
        self._next = 0
        self._closed = False

    def retransmits(self) -> int | None:
        """Segments the kernel retransmitted on the session's connections since it opened (None: not told)."""
        counts = [tcp_retransmits(conn.sock) for conn in self._conns]
        if None in counts or None in self._retransmits_at_open:
            return None
        return sum(counts) - sum(self._retransmits_at_open)

    def start(self) -> None:
        """Start every connection's threads."""
        for conn in self._conns:
            for thread in conn.threads:
                thread.start()

    def _check(self) -> None:
        failure = self._failure
        if failure is None:
            return
        if isinstance(failure, PrfaasError):
            raise failure
        raise TransportBroken(f"transfer {self.manifest.transfer_id}: {failure!r}") from failure

    async def _wait_progress(self, what: str) -> None:
        self._progress.clear()
        try:
            async with asyncio.timeout(self.config.io_timeout_s):
                await self._progress.wait()
        except TimeoutError as e:
            raise TransportBroken(
                f"transfer {self.manifest.transfer_id}: no {what} for {self.config.io_timeout_s:.0f}s"
            ) from e
        self._check()

    async def send(self, chunk: OutChunk) -> None:
        """Queue a chunk on the next connection once the window has room."""
        self._check()
        with self.link.counters.window_wait(self._inflight_bytes >= self.config.window_bytes):
            while self._inflight_bytes >= self.config.window_bytes:
                await self._wait_progress("ack")
        self._dispatch(chunk, 0)

    def _dispatch(self, chunk: OutChunk, attempt: int) -> None:
        flight = _Flight(chunk, attempt)
        size = len(chunk.payload)
        self._flights[(chunk.part, chunk.offset)] = flight
        self._inflight_bytes += size
        self.sent_chunks += 1
        self.sent_bytes += size
        self.link.counters.sent(size)
        conn = self._conns[self._next % len(self._conns)]
        self._next += 1
        conn.queue.put(flight)

    def on_frame(self, msg: object) -> None:
        """Handle a receiver frame (on the loop)."""
        if isinstance(msg, KvChunkAck):
            flight = self._flights.pop((msg.part, msg.offset), None)
            if flight is None:
                return
            size = len(flight.chunk.payload)
            self._inflight_bytes -= size
            if msg.ok:
                rtt = time.monotonic() - flight.sent_at if flight.sent_at else None
                self.link.counters.acked(size, rtt)
            else:
                self.link.counters.lost(size)
                self.link.counters.retransmitted(size)
                self.resent_chunks += 1
                if flight.attempt + 1 >= self.config.max_chunk_attempts:
                    self._fail(
                        TransferFailed(
                            f"chunk {msg.part}@{msg.offset} of {msg.transfer_id} rejected {flight.attempt + 1} times"
                        )
                    )
                    return
                log.info(
                    "chunk rejected, resending",
                    extra={
                        "transfer_id": msg.transfer_id,
                        "part": msg.part,
                        "offset": msg.offset,
                        "attempt": flight.attempt + 1,
                    },
                )
                self._dispatch(flight.chunk, flight.attempt + 1)
            self._progress.set()
        elif isinstance(msg, KvResumeState):
            if self._reply is not None and not self._reply.done():
                self._reply.set_result(msg)
        elif isinstance(msg, ErrorReply):
            self._fail(_error(msg))

    def on_broken(self, exc: BaseException) -> None:
        """A connection failed (on the loop)."""
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None and not self._closed:
            self._failure = exc
            self._progress.set()
            if self._reply is not None and not self._reply.done():
                self._reply.set_result(KvResumeState(transfer_id=self.manifest.transfer_id, complete=False))

    async def end(self, digests: list[int], missing: MissingChunks) -> None:
        """Wait for every ack, send the end marker, and resend whatever the receiver still lacks."""
        if self.complete:
            return
        for _ in range(self.config.max_end_rounds):
            while self._flights:
                await self._wait_progress("ack")
            self._check()
            self._reply = self.loop.create_future()
            self._conns[0].queue.put(frame(encode(KvEnd(transfer_id=self.manifest.transfer_id, digests=digests))))
            try:
                async with asyncio.timeout(self.config.io_timeout_s):
                    state = await self._reply
            except TimeoutError as e:
                raise TransportBroken(f"transfer {self.manifest.transfer_id}: no reply to the end marker") from e
            self._check()
            if state.complete:
                self.complete = True
                return
            for chunk in missing(held_map(state.held)):
                self.resent_chunks += 1
                await self.send(chunk)
        raise TransferFailed(
            f"transfer {self.manifest.transfer_id}: incomplete after {self.config.max_end_rounds} end rounds"
        )

    async def close(self) -> None:
        """Stop and join the connection threads (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            conn.stop()
        for conn in self._conns:
            await asyncio.to_thread(conn.join)
        if self._inflight_bytes:
            self.link.counters.lost(self._inflight_bytes)
            self._inflight_bytes = 0
        self._flights.clear()
