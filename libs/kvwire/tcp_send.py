"""Direct TCP, prefill side: N parallel connections per transfer, chunks striped across them.

Connections come from a ``ConnectionPool`` (``libs/kvwire/pool.py``): a transfer to a destination
whose stripes are warm pays neither a connect nor slow start. The begin goes on the first stripe at
once and the data follows its answer (what the receiver holds: a resumed transfer sends only the
rest); the other stripes join without waiting for theirs. Each connection's writer thread paces,
then ``sendmsg``s header and payload memoryview (no copy); its reader thread hands acks to the
event loop, which keeps the books: the chunks in flight, a window of unacknowledged bytes, resends
of chunks the receiver rejected, RTT samples from acks. The end marker follows the last chunk on
the first stripe without waiting for the acks (the receiver answers once every chunk is there).
A broken or stalled connection breaks the session (``TransportBroken``); the sender reopens it and
the receiver's resume state says what not to send again. A reused connection found closed or reset
before the receiver answered on it is ``StaleConnection``: the pool drops its idle connections to
that destination and the sender tries again on fresh ones without counting an attempt (a stalled
one counts: a fresh connection over the same path would stall too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from dataclasses import dataclass

from libs.common.errors import PrfaasError, TransferFailed, error_from_code
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
)
from libs.kvwire.format import DEFAULT_CHUNK_BYTES, frame, held_map
from libs.kvwire.link import Link
from libs.kvwire.pool import ConnectionPool, PooledConnection
from libs.kvwire.sender import Destination, MissingChunks, OutChunk, StaleConnection, TransportBroken
from libs.kvwire.sockets import Stream, TlsStream, send_all, set_deadline, tcp_retransmits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TcpConfig:
    """Connections, chunking, window, deadlines and pooling of direct TCP transfers."""

    connections: int = 4
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    window_bytes: int = 64 << 20  # unacknowledged bytes per transfer
    connect_timeout_s: float = 5.0
    io_timeout_s: float = 30.0  # a send, an ack or a reply slower than this breaks the session
    max_chunk_attempts: int = 5  # a chunk rejected this often fails the transfer
    max_end_rounds: int = 3
    pool: bool = True  # keep connections open between transfers, per destination (host, port)
    pool_idle_s: float = 60.0  # a pooled connection unused this long is closed
    keepalive_s: float = 0.1  # a connection with nothing to send for this long sends a keepalive frame (0: never)
    tls: ssl.SSLContext | None = None  # mutual TLS (``pki.client_context``), the receiver's host checked; None: plain


class _Flight:
    """A chunk sent and not yet acknowledged (written by a connection's writer thread)."""

    __slots__ = ("chunk", "attempt", "sent_at", "session")

    def __init__(self, chunk: OutChunk, attempt: int, session: _TcpSession) -> None:
        self.chunk = chunk
        self.attempt = attempt
        self.session = session
        self.sent_at = 0.0  # set by the writer thread once the bytes are in the socket

    def write(self, sock: Stream, stopping: threading.Event) -> bool:
        """Pace, then send header and payload; False if the connection is stopping."""
        link, transfer_id = self.session.link, self.session.manifest.transfer_id
        # Checksummed here, in parallel with the other connections, just before the socket copies it.
        header = frame(encode(self.chunk.header(transfer_id, self.attempt)))
        payload = self.chunk.payload
        if not link.bucket.wait_blocking(len(header) + len(payload), stopping, link.order_of(transfer_id)):
            return False
        send_all(sock, header, payload)
        self.sent_at = time.monotonic()
        return True


def _error(reply: ErrorReply) -> PrfaasError:
    return error_from_code(reply.code, reply.message)


class TcpTransport:
    """Sends transfers to ``TcpReceiverServer``s over pooled connections (``pool``: shareable by stripe counts)."""

    def __init__(self, config: TcpConfig | None = None, pool: ConnectionPool | None = None) -> None:
        self.config = config or TcpConfig()
        self.chunk_bytes = self.config.chunk_bytes
        self.pool = pool or ConnectionPool(self.config)

    async def open(self, manifest: KvManifest, dest: Destination, link: Link) -> _TcpSession:
        """Claim the stripes, begin (or resume) the transfer, and join the other stripes to it."""
        session = _TcpSession(manifest, link, self.config, self.pool, asyncio.get_running_loop())
        try:
            await session.begin((dest.host, dest.port))
        except OSError as e:
            await session.close()
            raise TransportBroken(
                f"cannot open transfer {manifest.transfer_id} at {dest.host}:{dest.port}: {e!r}"
            ) from e
        except BaseException:
            await session.close()
            raise
        return session

    async def abort(self, transfer_id: str, dest: Destination, reason: str) -> None:
        """Tell the receiver at ``dest`` to drop ``transfer_id`` (on a connection of its own)."""
        await asyncio.to_thread(self._abort, transfer_id, dest, reason)

    async def close(self) -> None:
        """Close the pool's connections."""
        await self.pool.close()

    def _abort(self, transfer_id: str, dest: Destination, reason: str) -> None:
        try:
            (stream,) = self.pool.connect((dest.host, dest.port), 1)
            # Within the connect's deadline, not a transfer's: a silent receiver must not hold a worker thread long.
            set_deadline(stream.sock if isinstance(stream, TlsStream) else stream, self.config.connect_timeout_s)
            try:
                stream.sendall(frame(encode(KvAbort(transfer_id=transfer_id, reason=reason))))
                stream.recv_into(memoryview(bytearray(1)))  # the receiver closes once the transfer is dropped
            finally:
                stream.close()
        except OSError as e:
            raise TransferFailed(f"abort of {transfer_id} not delivered to {dest.host}:{dest.port}: {e!r}") from e


class _TcpSession:
    """One open attempt of a transfer over direct TCP (books kept on the event loop)."""

    def __init__(
        self, manifest: KvManifest, link: Link, config: TcpConfig, pool: ConnectionPool, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.manifest = manifest
        self.link = link
        self.config = config
        self.pool = pool
        self.loop = loop
        self.held: dict[int, bytes] = {}
        self.complete = False
        self.sent_chunks = 0
        self.sent_bytes = 0
        self.resent_chunks = 0
        self.stripes = 0
        self._conns: list[PooledConnection] = []
        self._retransmits_at_open: list[int | None] = []
        self._answered: set[PooledConnection] = set()  # connections the receiver answered on in this session
        self._flights: dict[tuple[int, int], _Flight] = {}
        self._inflight_bytes = 0
        self._progress = asyncio.Event()
        self._begun: asyncio.Future[KvResumeState | None] = loop.create_future()
        self._reply: asyncio.Future[KvResumeState | None] | None = None
        self._end_round = -1
        self._failure: BaseException | None = None
        self._next = 0
        self._closed = False

    async def begin(self, endpoint: tuple[str, int]) -> None:
        """Claim the stripes, send the begin and wait for the answer (what the receiver holds), then join the rest."""
        self._conns = await self.pool.claim(endpoint, self.config.connections, self)
        self.stripes = len(self._conns)
        self._retransmits_at_open = [tcp_retransmits(conn.sock) for conn in self._conns]
        self._conns[0].send(frame(encode(KvBegin(manifest=self.manifest))))
        state = await self._answer(self._begun, "begin")
        self.held = held_map(state.held)
        self.complete = state.complete
        if not self.complete:
            for i, conn in enumerate(self._conns[1:], 1):  # chunks may follow at once: frames keep their order
                conn.send(frame(encode(KvJoin(transfer_id=self.manifest.transfer_id, conn=i))))

    def retransmits(self) -> int | None:
        """Segments the kernel retransmitted on the session's connections since it opened (None: not told)."""
        counts = [tcp_retransmits(conn.sock) for conn in self._conns]
        if None in counts or None in self._retransmits_at_open:
            return None
        return sum(counts) - sum(self._retransmits_at_open)

    # --- called from connection threads ---------------------------------------------------

    def on_frame(self, conn: PooledConnection, msg: object) -> None:
        """A receiver frame (hands it to the loop)."""
        with contextlib.suppress(RuntimeError):  # loop closed
            self.loop.call_soon_threadsafe(self._on_frame, conn, msg)

    def on_broken(self, conn: PooledConnection, exc: BaseException) -> None:
        """A connection failed (hands it to the loop)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._on_broken, conn, exc)

    # --- on the loop ------------------------------------------------------------------------

    def _check(self) -> None:
        failure = self._failure
        if failure is None:
            return
        if isinstance(failure, PrfaasError | TransportBroken):
            raise failure
        raise TransportBroken(f"transfer {self.manifest.transfer_id}: {failure!r}") from failure

    async def _answer(self, future: asyncio.Future[KvResumeState | None], what: str) -> KvResumeState:
        try:
            async with asyncio.timeout(self.config.io_timeout_s):
                state = await future
        except TimeoutError as e:
            raise TransportBroken(f"transfer {self.manifest.transfer_id}: no answer to the {what}") from e
        self._check()
        if state is None:
            raise TransportBroken(f"transfer {self.manifest.transfer_id}: no answer to the {what}")
        return state

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
        flight = _Flight(chunk, attempt, self)
        size = len(chunk.payload)
        self._flights[(chunk.part, chunk.offset)] = flight
        self._inflight_bytes += size
        self.sent_chunks += 1
        self.sent_bytes += size
        self.link.counters.sent(size)
        conn = self._conns[self._next % len(self._conns)]
        self._next += 1
        conn.send(flight)

    def _on_frame(self, conn: PooledConnection, msg: object) -> None:
        if self._closed:
            return
        if isinstance(msg, ErrorReply):
            self._answered.add(conn)
            self._fail(_error(msg))
            return
        if getattr(msg, "transfer_id", None) != self.manifest.transfer_id:
            return  # a late answer about the connection's previous transfer
        self._answered.add(conn)
        if isinstance(msg, KvChunkAck):
            self._acked(msg)
        elif isinstance(msg, KvResumeState):
            if msg.end_round < 0 and not self._begun.done():
                self._begun.set_result(msg)
            elif msg.end_round == self._end_round and self._reply is not None and not self._reply.done():
                self._reply.set_result(msg)

    def _acked(self, msg: KvChunkAck) -> None:
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

    def _on_broken(self, conn: PooledConnection, exc: BaseException) -> None:
        if conn.reused and conn not in self._answered and not isinstance(exc, TimeoutError):  # gone, not stalled
            self.pool.flush(conn.endpoint)
            exc = StaleConnection(
                f"transfer {self.manifest.transfer_id}: a pooled connection to {conn.endpoint[0]}:{conn.endpoint[1]} "
                f"was gone before the receiver answered on it: {exc!r}"
            )
        self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None and not self._closed:
            self._failure = exc
            self._progress.set()
            for future in (self._begun, self._reply):
                if future is not None and not future.done():
                    future.set_result(None)

    async def end(self, digests: list[int], missing: MissingChunks) -> None:
        """Send the end marker behind the last chunk; resend whatever the receiver says it lacks; settle the acks."""
        for round_ in range(self.config.max_end_rounds):
            if self.complete:
                break
            self._check()
            settled = not self._flights
            self._end_round = round_
            self._reply = self.loop.create_future()
            self._conns[0].send(
                frame(encode(KvEnd(transfer_id=self.manifest.transfer_id, digests=digests, round=round_)))
            )
            state = await self._answer(self._reply, "end marker")
            if state.complete:
                self.complete = True
                break
            if not settled:  # answered before every chunk was acknowledged: ask again once they are
                while self._flights:
                    await self._wait_progress("ack")
                continue
            for chunk in missing(held_map(state.held)):
                self.resent_chunks += 1
                await self.send(chunk)
        else:
            raise TransferFailed(
                f"transfer {self.manifest.transfer_id}: incomplete after {self.config.max_end_rounds} end rounds"
            )
        await self._settle()

    async def _settle(self) -> None:
        """Wait for acks still on their way after the receiver verified everything (the stripes go back clean)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.io_timeout_s):
                while self._flights and self._failure is None:
                    self._progress.clear()
                    await self._progress.wait()

    async def close(self) -> None:
        """Give clean stripes back to the pool, close the others (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.complete and self._failure is None and not self._flights:
            self.pool.release(self._conns)
        else:
            for conn in self._conns:
                conn.close()
            for conn in self._conns:
                await asyncio.to_thread(conn.join)
        if self._inflight_bytes:
            self.link.counters.lost(self._inflight_bytes)
            self._inflight_bytes = 0
        self._flights.clear()
