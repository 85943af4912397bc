"""Direct TCP, decode side: accept connections and write chunks straight into receiver memory.

Each connection is served by one thread with a blocking socket: it reads a frame header, asks
the transfer where the payload goes, ``recv_into`` that memory (``MSG_WAITALL``: one system call
per chunk), verifies the checksum in place and answers with a ``KvChunkAck``. Blocking sockets in
threads move several GB/s on loopback where asyncio streams move a fraction of that; checksums
and socket copies release the GIL.

A connection serves transfers one after another (senders keep their connections: a begin or join
binds it to the next transfer) and ignores keepalive frames. The end marker travels behind the
sender's last chunk on one connection, ahead of chunks still on their way on the others: it is
answered at once when every chunk is there, else by the connection whose chunk completes the
transfer. A chunk resent while its transfer completed is acknowledged as held.

Hostile input costs a bounded header buffer and is counted (``prfaas_kv_tcp_refused_total`` by
reason, a log line per reason at most every ``LOG_EVERY_S``): a frame that does not decode, a chunk
that does not fit its transfer's layout (checked before its payload is read) and a transfer the
receiver refuses (no reservation, over it: before any memory is taken) end the connection with a
typed error. Sockets block without kernel deadlines: a watchdog on the event loop cuts a
connection silent between frames for ``io_timeout_s``, one whose frame header is still incomplete
``header_timeout_s`` after its first byte (a slow sender), and one stalled ``io_timeout_s`` in a
payload or a reply. Past ``max_connections`` new connections are closed at once. With ``tls``
(mutual: ``pki.server_context``) every connection completes a TLS handshake within
``header_timeout_s`` before any frame is read; a peer without a certificate signed by the CA is
refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import struct
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass

import msgspec
from prometheus_client import CollectorRegistry, Counter

from libs.common.errors import BadRequest, PrfaasError, TransferFailed
from libs.common.messages import (
    ErrorReply,
    KvAbort,
    KvBegin,
    KvChunk,
    KvChunkAck,
    KvEnd,
    KvJoin,
    KvResumeState,
    encode,
    kv_sender_frame_decoder,
)
from libs.kvwire.assembly import TransferAssembly
from libs.kvwire.format import FRAME_PREFIX, check_chunk, frame
from libs.kvwire.receiver import KvReceiver
from libs.kvwire.sockets import Closed, Stream, TlsStream, handshake, read_frame, recv_exact

log = logging.getLogger(__name__)

_TCPI_BYTES_RECEIVED = struct.Struct("@Q")  # tcpi_bytes_received, at offset 128 of Linux's struct tcp_info
_TCPI_BYTES_RECEIVED_AT = 128


LOG_EVERY_S = 10.0  # refusals of one reason are logged at most this often (the counter counts every one)
_REFUSED_BY_STAGE = {"frame": "bad_frame", "chunk": "bad_chunk", "transfer": "transfer_refused"}


def _tcp_bytes_received(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_BYTES_RECEIVED_AT + _TCPI_BYTES_RECEIVED.size)
    return _TCPI_BYTES_RECEIVED.unpack_from(info, _TCPI_BYTES_RECEIVED_AT)[0]


class _PendingEnds:
    """End markers that arrived before every chunk of their transfer, until a chunk completes it (thread-safe)."""

    LIMIT = 4096  # the oldest is forgotten beyond this (its sender times out and ends again)

    def __init__(self, receiver: KvReceiver) -> None:
        self.receiver = receiver
        self._lock = threading.Lock()
        self._ends: dict[str, KvEnd] = {}

    def end(self, msg: KvEnd) -> KvResumeState | None:
        """The answer to an end marker: now if every chunk is there, else None (kept for ``chunk``)."""
        with self._lock:
            self._ends.pop(msg.transfer_id, None)
            state = self.receiver.end(msg)
            if state.complete:
                return msgspec.structs.replace(state, end_round=msg.round)
            self._ends[msg.transfer_id] = msg
            if len(self._ends) > self.LIMIT:
                del self._ends[next(iter(self._ends))]
            return None

    def chunk(self, transfer_id: str) -> KvResumeState | None:
        """After a chunk of ``transfer_id`` was verified: the answer to its waiting end marker if it is complete now."""
        with self._lock:
            msg = self._ends.get(transfer_id)
            if msg is None:
                return None
            state = self.receiver.end(msg)
            if not state.complete:
                return None
            del self._ends[transfer_id]
            return msgspec.structs.replace(state, end_round=msg.round)

    def drop(self, transfer_id: str) -> None:
        """Forget the end marker of an aborted transfer."""
        with self._lock:
            self._ends.pop(transfer_id, None)


@dataclass(frozen=True)
class TcpServerConfig:
    """Where the decode gateway listens for KV, how long a connection may stall, how many may be open, TLS."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see ``TcpReceiverServer.address``)
    io_timeout_s: float = 60.0  # silent this long between frames, or stalled this long in a payload or reply: cut
    header_timeout_s: float = 5.0  # a frame header (or a TLS handshake) not complete this long after it began: cut
    max_connections: int = 256  # open at once; more are closed as soon as they are accepted
    backlog: int = 64
    tls: ssl.SSLContext | None = None  # mutual TLS (``pki.server_context``); None: plain TCP


class _Refusals:
    """Connections refused or cut, by reason: a Prometheus counter and a log line per reason at most every ``LOG_EVERY_S``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "prfaas_kv_tcp_refused", "KV TCP connections refused or cut, by reason", ["reason"], registry=registry
        )
        self._lock = threading.Lock()
        self._logged_at: dict[str, float] = {}
        self._unlogged: Tally[str] = Tally()

    def count(self, reason: str, peer: tuple, error: object) -> None:
        """Count one refusal; log it unless its reason was logged within ``LOG_EVERY_S``."""
        self.counter.labels(reason=reason).inc()
        now = time.monotonic()
        with self._lock:
            if now - self._logged_at.get(reason, -math.inf) < LOG_EVERY_S:
                self._unlogged[reason] += 1
                return
            self._logged_at[reason] = now
            unlogged = self._unlogged.pop(reason, 0)
        log.warning(
            "kv connection refused",
            extra={"reason": reason, "peer": peer, "error": str(error), "unlogged_since_last": unlogged},
        )


class TcpReceiverServer:
    """Listens for senders and feeds their chunks to a ``KvReceiver``."""

    def __init__(
        self, receiver: KvReceiver, config: TcpServerConfig | None = None, registry: CollectorRegistry | None = None
    ) -> None:
        self.receiver = receiver
        self.config = config or TcpServerConfig()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._refusals = _Refusals(self.registry)
        self._listener: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = threading.Lock()
        self._conns: dict[_Connection, threading.Thread] = {}
        self._ends = _PendingEnds(receiver)
        self._closed_wire_bytes = 0
        self.accepted_total = 0  # connections accepted since the start

    @property
    def open_connections(self) -> int:
        """Connections open now."""
        with self._lock:
            return len(self._conns)

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the server listens on."""
        if self._listener is None:
            raise RuntimeError("server not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    def refused(self, reason: str) -> int:
        """Connections refused or cut for ``reason`` since the start."""
        value = self.registry.get_sample_value("prfaas_kv_tcp_refused_total", {"reason": reason})
        return int(value or 0)

    def wire_bytes_received(self) -> int:
        """Bytes the kernel has received on every connection so far, closed ones included (Linux ``TCP_INFO``).

        It counts what crossed the wire when it crossed, however late the receiving threads read it.
        """
        with self._lock:
            total = self._closed_wire_bytes
            for conn in self._conns:
                with contextlib.suppress(OSError):  # closing under us: counted when closed
                    total += _tcp_bytes_received(conn.sock)
            return total

    async def start(self) -> None:
        """Bind, listen, start accepting and watching deadlines."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.config.host, self.config.port))
        listener.listen(self.config.backlog)
        listener.setblocking(False)
        self._listener = listener
        self._tasks = [
            asyncio.create_task(self._accept_loop(listener), name="kv-tcp-accept"),
            asyncio.create_task(self._watch_loop(), name="kv-tcp-watchdog"),
        ]

    async def stop(self) -> None:
        """Stop accepting, drop every connection and join their threads (idempotent)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = dict(self._conns)
        for conn in conns:
            conn.cut("")
        for thread in conns.values():
            await asyncio.to_thread(thread.join)

    async def __aenter__(self) -> TcpReceiverServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, peer = await loop.sock_accept(listener)
            if self.open_connections >= self.config.max_connections:
                sock.close()
                self._refusals.count("too_many_connections", peer, f"{self.config.max_connections} open")
                continue
            sock.settimeout(None)  # blocking, without kernel deadlines: the watchdog keeps them
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(self.receiver, sock, self._ends, self.config)
            thread = threading.Thread(target=self._serve, args=(conn, peer), name=f"kv-tcp-{peer[1]}", daemon=True)
            with self._lock:
                self._conns[conn] = thread
                self.accepted_total += 1
            thread.start()

    async def _watch_loop(self) -> None:
        """Cut connections past their deadline (their threads are blocked in a receive)."""
        period_s = min(0.25, self.config.header_timeout_s / 4, self.config.io_timeout_s / 4)
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                deadline, reason = conn.deadline
                if now > deadline:
                    conn.cut(reason)

    def _serve(self, conn: _Connection, peer: tuple) -> None:
        """One connection's loop (in its own thread)."""
        handshaking = self.config.tls is not None
        try:
            if self.config.tls is not None:
                conn.secure(self.config.tls)
                handshaking = False
            conn.run()
        except PrfaasError as e:
            self._refusals.count(_REFUSED_BY_STAGE[conn.stage], peer, e)
            with contextlib.suppress(OSError):
                conn.stream.sendall(frame(encode(ErrorReply(code=e.code, message=e.message))))
        except (Closed, OSError) as e:
            tls = handshaking or isinstance(e, ssl.SSLError)
            reason = conn.cut_reason or ("tls" if tls else "")
            if reason:
                self._refusals.count(reason, peer, repr(e))
            else:
                log.debug("kv connection closed", extra={"peer": peer, "error": repr(e)})
        finally:
            with self._lock:
                with contextlib.suppress(OSError):
                    self._closed_wire_bytes += _tcp_bytes_received(conn.sock)
                self._conns.pop(conn, None)
            conn.sock.close()


class _Connection:
    """Frame handling of one connection (bound to one transfer by its begin or join), under a watchdog's deadline."""

    def __init__(self, receiver: KvReceiver, sock: socket.socket, ends: _PendingEnds, config: TcpServerConfig) -> None:
        self.receiver = receiver
        self.sock = sock
        self.stream: Stream = sock
        self.ends = ends
        self.config = config
        self.prefix = bytearray(FRAME_PREFIX.size)
        self.assembly: TransferAssembly | None = None
        self.scratch = bytearray()
        self.stage = "frame"  # what a refusal is about: "frame", "chunk" or "transfer"
        self.deadline = (math.inf, "")  # (monotonic s, reason to cut); a TLS handshake keeps its own
        self.cut_reason = ""

    def watch(self, seconds: float, reason: str) -> None:
        """The watchdog cuts the connection for ``reason`` unless it moves on within ``seconds``."""
        self.deadline = (time.monotonic() + seconds, reason)

    def cut(self, reason: str) -> None:
        """Shut the socket down under the thread blocked on it (from the watchdog, or "" when stopping)."""
        self.cut_reason = self.cut_reason or reason
        self.deadline = (math.inf, "")
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def secure(self, context: ssl.SSLContext) -> None:
        """Complete the TLS handshake (the client's certificate is verified against the CA)."""
        stream = TlsStream(self.sock, context)
        handshake([stream], self.config.header_timeout_s)
        self.stream = stream

    def reply(self, msg: msgspec.Struct) -> None:
        """Send one frame back to the sender."""
        self.stream.sendall(frame(encode(msg)))

    def run(self) -> None:
        """Serve frames until the peer closes or aborts (a keepalive reads as None: none of them)."""
        while True:
            self.stage = "frame"
            self.watch(self.config.io_timeout_s, "idle")
            msg = read_frame(self.stream, self.prefix, kv_sender_frame_decoder, self.frame_started)
            self.watch(self.config.io_timeout_s, "stalled")
            if isinstance(msg, KvChunk):
                self.stage = "chunk"
                self.chunk(msg)
                continue
            self.stage = "transfer"
            if isinstance(msg, KvBegin):
                state = self.receiver.begin(msg.manifest)
                self.assembly = self.receiver.assembly(msg.manifest.transfer_id) if not state.complete else None
                self.reply(state)
            elif isinstance(msg, KvJoin):
                self.assembly = self.receiver.assembly(msg.transfer_id)
                self.reply(self.receiver.status(msg.transfer_id))
            elif isinstance(msg, KvEnd):
                state = self.ends.end(msg)
                if state is not None:
                    self.reply(state)
            elif isinstance(msg, KvAbort):
                self.ends.drop(msg.transfer_id)
                self.receiver.abort(msg.transfer_id, msg.reason or "aborted by sender")
                return

    def frame_started(self) -> None:
        """A frame's first bytes are in: the rest of its header has ``header_timeout_s``."""
        self.watch(self.config.header_timeout_s, "slow_frame")

    def chunk(self, header: KvChunk) -> None:
        """Receive one chunk's payload in place, verify it and acknowledge it (a lying header is refused unread)."""
        assembly = self.assembly
        if assembly is None or header.transfer_id != assembly.manifest.transfer_id:
            raise BadRequest(f"chunk of {header.transfer_id} on a connection not joined to it")  # payload unread
        check_chunk(header, assembly.manifest.chunk_bytes)
        try:
            target = assembly.target(header)
        except TransferFailed:
            if not self.verified(header.transfer_id):
                raise
            target = True  # resent while the transfer completed
        if isinstance(target, bool):  # held already (ok), or being written by another connection (resend)
            self.discard(header.length)
            ok = target
        else:
            try:
                recv_exact(self.stream, target)
            except BaseException:
                assembly.abandon(header)
                raise
            ok = assembly.commit(header, target)
        self.reply(KvChunkAck(transfer_id=header.transfer_id, part=header.part, offset=header.offset, ok=ok))
        done = self.ends.chunk(header.transfer_id) if ok else None
        if done is not None:
            self.reply(done)

    def verified(self, transfer_id: str) -> bool:
        """The transfer completed (it may have been handed over and released since)."""
        try:
            return self.receiver.status(transfer_id).complete
        except TransferFailed:
            return False

    def discard(self, nbytes: int) -> None:
        """Read and drop ``nbytes`` of payload."""
        if len(self.scratch) < min(nbytes, 4 << 20):
            self.scratch = bytearray(min(nbytes, 4 << 20))
        view = memoryview(self.scratch)
        while nbytes:
            step = min(nbytes, len(view))
            recv_exact(self.stream, view[:step])
            nbytes -= step
