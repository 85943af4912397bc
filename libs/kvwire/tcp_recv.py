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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from dataclasses import dataclass

import msgspec

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
from libs.kvwire.format import FRAME_PREFIX, frame
from libs.kvwire.receiver import KvReceiver
from libs.kvwire.sockets import Closed, read_frame, recv_exact, set_deadline

log = logging.getLogger(__name__)

_TCPI_BYTES_RECEIVED = struct.Struct("@Q")  # tcpi_bytes_received, at offset 128 of Linux's struct tcp_info
_TCPI_BYTES_RECEIVED_AT = 128


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
    """Where the decode gateway listens for KV, and how long a connection may stall."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see ``TcpReceiverServer.address``)
    io_timeout_s: float = 60.0  # a connection silent this long is dropped
    backlog: int = 64


class TcpReceiverServer:
    """Listens for senders and feeds their chunks to a ``KvReceiver``."""

    def __init__(self, receiver: KvReceiver, config: TcpServerConfig | None = None) -> None:
        self.receiver = receiver
        self.config = config or TcpServerConfig()
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
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

    def wire_bytes_received(self) -> int:
        """Bytes the kernel has received on every connection so far, closed ones included (Linux ``TCP_INFO``).

        It counts what crossed the wire when it crossed, however late the receiving threads read it.
        """
        with self._lock:
            total = self._closed_wire_bytes
            for sock in self._conns:
                with contextlib.suppress(OSError):  # closing under us: counted when closed
                    total += _tcp_bytes_received(sock)
            return total

    async def start(self) -> None:
        """Bind, listen and start accepting."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.config.host, self.config.port))
        listener.listen(self.config.backlog)
        listener.setblocking(False)
        self._listener = listener
        self._accept_task = asyncio.create_task(self._accept_loop(listener), name="kv-tcp-accept")

    async def stop(self) -> None:
        """Stop accepting, drop every connection and join their threads (idempotent)."""
        task, self._accept_task = self._accept_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = dict(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
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
            set_deadline(sock, self.config.io_timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve, args=(sock, peer), name=f"kv-tcp-{peer[1]}", daemon=True)
            with self._lock:
                self._conns[sock] = thread
                self.accepted_total += 1
            thread.start()

    def _serve(self, sock: socket.socket, peer: tuple) -> None:
        """One connection's loop (in its own thread)."""
        conn = _Connection(self.receiver, sock, self._ends)
        try:
            conn.run()
        except (Closed, OSError) as e:
            log.debug("kv connection closed", extra={"peer": peer, "error": repr(e)})
        except PrfaasError as e:
            log.info("kv connection refused", extra={"peer": peer, "error": str(e)})
            with contextlib.suppress(OSError):
                sock.sendall(frame(encode(ErrorReply(code=e.code, message=e.message))))
        finally:
            with self._lock:
                with contextlib.suppress(OSError):
                    self._closed_wire_bytes += _tcp_bytes_received(sock)
                self._conns.pop(sock, None)
            sock.close()


class _Connection:
    """Frame handling of one connection (bound to one transfer by its begin or join)."""

    def __init__(self, receiver: KvReceiver, sock: socket.socket, ends: _PendingEnds) -> None:
        self.receiver = receiver
        self.sock = sock
        self.ends = ends
        self.prefix = bytearray(FRAME_PREFIX.size)
        self.assembly: TransferAssembly | None = None
        self.scratch = bytearray()

    def reply(self, msg: msgspec.Struct) -> None:
        """Send one frame back to the sender."""
        self.sock.sendall(frame(encode(msg)))

    def run(self) -> None:
        """Serve frames until the peer closes or aborts (a keepalive reads as None: none of them)."""
        while True:
            msg = read_frame(self.sock, self.prefix, kv_sender_frame_decoder)
            if isinstance(msg, KvChunk):
                self.chunk(msg)
            elif isinstance(msg, KvBegin):
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

    def chunk(self, header: KvChunk) -> None:
        """Receive one chunk's payload in place, verify it and acknowledge it."""
        assembly = self.assembly
        if assembly is None or header.transfer_id != assembly.manifest.transfer_id:
            self.discard(header.length)
            raise BadRequest(f"chunk of {header.transfer_id} on a connection not joined to it")
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
                recv_exact(self.sock, target)
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
            recv_exact(self.sock, view[:step])
            nbytes -= step
