"""Blocking-socket framing shared by both ends of direct TCP (used from worker threads only), with optional TLS.

Sockets stay in blocking mode, the sender's with their deadline kept by the kernel (``SO_RCVTIMEO``,
``SO_SNDTIMEO``; the receiver's are cut by its watchdog): a chunk's payload is one ``recv_into``
with ``MSG_WAITALL`` and one ``sendmsg``. A Python-level socket timeout would instead make the
descriptor non-blocking and put a ``poll`` and a GIL hand-off before every partial read or write. ``tcp_retransmits`` reads what the kernel
counts of a connection (Linux ``TCP_INFO``): a cheap system call, also safe on the event loop.

TLS (``TlsStream``) runs OpenSSL on memory buffers over the same blocking socket: a sender's
connection has a reader thread and a writer thread, and one OpenSSL connection object must never be
used by two threads at once, so every OpenSSL call holds the stream's lock while the socket I/O
itself happens outside it (a blocked read never holds up a write). ``handshake`` runs the
handshakes of several sockets at once (one round trip for all, not one each) within a deadline.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from libs.common.config import EnvReader
from libs.common.errors import BadRequest
from libs.common.pki import CertFiles
from libs.kvwire.format import FRAME_PREFIX, MAX_HEADER_BYTES

_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux only
_TOTAL_RETRANS = struct.Struct("@I")  # struct tcp_info's tcpi_total_retrans (__u32)
_TOTAL_RETRANS_OFFSET = 100  # after 8 bytes of __u8 fields and 23 __u32 ones (linux/tcp.h, stable ABI)
_HEADER_STEP_BYTES = 64 << 10  # a frame header's buffer grows by what arrived, never by what its prefix claims
_TLS_READ_BYTES = 256 << 10  # ciphertext read from the socket at a time
_TLS_SLICE_BYTES = 256 << 10  # plaintext encrypted and sent at a time


KEEPALIVE = FRAME_PREFIX.pack(0)  # a frame with an empty header: keeps a quiet connection's window, ignored by readers


class Closed(Exception):
    """The peer closed the connection between frames."""


class TlsStream:
    """A TLS connection over a connected blocking socket, for one reader thread and one writer thread.

    It offers what the framing uses of a socket (``recv_into``, ``sendall``, ``getsockopt``,
    ``shutdown``, ``close``); ``handshake`` must have completed first.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_hostname: str | None = None) -> None:
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        server_side = server_hostname is None
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side, server_hostname)
        self._lock = threading.Lock()  # every OpenSSL call
        self._send_lock = threading.Lock()  # ciphertext leaves in the order it was made
        self._unsent = b""  # handshake bytes the socket did not take yet
        self._ciphertext = bytearray(_TLS_READ_BYTES)  # read from the socket (reader thread only)

    def recv_into(self, view: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        """Decrypted bytes into ``view`` (at least one; 0 at the end of the stream)."""
        while True:
            with self._lock:
                try:
                    return self._tls.read(len(view), view)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    return 0
            n = self.sock.recv_into(self._ciphertext)
            if not n:
                return 0  # frames delimit themselves: an end of stream needs no close-notify
            with self._lock:
                self._incoming.write(memoryview(self._ciphertext)[:n])

    def sendall(self, *buffers: bytes | memoryview) -> None:
        """Encrypt ``buffers`` and send them, with whatever OpenSSL had left to send (in slices: little memory)."""
        with self._send_lock:
            for data in buffers:
                view = memoryview(data)
                for start in range(0, len(view), _TLS_SLICE_BYTES):
                    with self._lock:
                        self._tls.write(view[start : start + _TLS_SLICE_BYTES])
                        ciphertext = self._outgoing.read()
                    self.sock.sendall(ciphertext)

    def getsockopt(self, *args):
        """The socket's option (``TCP_INFO`` and the like)."""
        return self.sock.getsockopt(*args)

    def shutdown(self, how: int) -> None:
        """Shut the socket down (unblocks the threads using it; no close-notify is sent)."""
        self.sock.shutdown(how)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def _step(self) -> int:
        """One handshake step: 0 when done, else the selector event it waits for (ciphertext queued to send)."""
        with self._lock:
            try:
                self._tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            pending = self._outgoing.pending
        if pending or self._unsent:
            return selectors.EVENT_WRITE
        return 0 if done else selectors.EVENT_READ

    def _pump(self, events: int) -> bool:
        """Move handshake bytes the socket is ready for (non-blocking); False at the peer's end of stream."""
        if events & selectors.EVENT_WRITE:
            with self._lock:
                data = self._unsent + self._outgoing.read()
            self._unsent = data[self.sock.send(data) :]
        if events & selectors.EVENT_READ:
            data = self.sock.recv(_TLS_READ_BYTES)
            if not data:
                return False
            with self._lock:
                self._incoming.write(data)
        return True


Stream = socket.socket | TlsStream


def handshake(streams: list[TlsStream], timeout_s: float) -> None:
    """Complete every stream's TLS handshake at once (``ssl.SSLError`` if a peer is refused, ``TimeoutError``)."""
    deadline = time.monotonic() + timeout_s
    for stream in streams:
        stream.sock.setblocking(False)
    try:
        with selectors.DefaultSelector() as selector:
            waiting = {}
            for stream in streams:
                event = stream._step()
                if event:
                    waiting[stream] = event
                    selector.register(stream.sock, event, stream)
            while waiting:
                ready = selector.select(max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError(f"TLS handshake not complete within {timeout_s:.1f}s")
                for key, events in ready:
                    stream = key.data
                    if not stream._pump(events):
                        raise ConnectionError("peer closed the connection during the TLS handshake")
                    event = stream._step()
                    if not event:
                        del waiting[stream]
                        selector.unregister(stream.sock)
                    elif event != waiting[stream]:
                        waiting[stream] = event
                        selector.modify(stream.sock, event, stream)
    finally:
        for stream in streams:
            stream.sock.setblocking(True)


def tls_files(r: EnvReader, key: str = "KV_TLS") -> CertFiles | None:
    """``<key>_CERT``, ``<key>_KEY`` and ``<key>_CA``: all three (existing files) or none; a partial set is refused."""
    names = [f"{key}_{part}" for part in ("CERT", "KEY", "CA")]
    paths = [r.str(name, "") for name in names]
    if not any(paths):
        return None
    for name, path in zip(names, paths, strict=True):
        if not path:
            given = ", ".join(r.prefix + n for n, p in zip(names, paths, strict=True) if p)
            raise r.error(name, path, f"TLS needs all of {', '.join(r.prefix + n for n in names)} (got {given})")
        if not Path(path).is_file():
            raise r.error(name, path, "no such file")
    return CertFiles(*(Path(p) for p in paths))


def set_deadline(sock: socket.socket, timeout_s: float) -> None:
    """Blocking mode, every receive and send bounded by ``timeout_s`` (``TimeoutError`` past it)."""
    sock.settimeout(None)
    seconds = int(timeout_s)
    timeval = struct.pack("@ll", seconds, int((timeout_s - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _recv_into(sock: Stream, view: memoryview, flags: int = socket.MSG_WAITALL) -> int:
    try:
        if isinstance(sock, TlsStream):
            return sock.recv_into(view)
        return sock.recv_into(view, len(view), flags)
    except BlockingIOError as e:  # the kernel's receive deadline passed with nothing read
        raise TimeoutError(f"no data for the socket's deadline: {e}") from e


def recv_exact(sock: Stream, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (``ConnectionError`` on EOF; one system call unless the deadline cuts it)."""
    got = 0
    total = len(view)
    while got < total:
        n = _recv_into(sock, view[got:])
        if n == 0:
            raise ConnectionError("connection closed mid-frame")
        got += n


def read_frame(
    sock: Stream,
    prefix: bytearray,
    decoder: msgspec.msgpack.Decoder,
    started: Callable[[], None] | None = None,
):
    """Read one frame's header message (None for a ``KEEPALIVE``).

    ``Closed`` on a clean EOF before the frame; ``TimeoutError`` only if nothing of the frame
    arrived within the socket timeout (the stream is still in sync); a stall mid-frame is a
    ``ConnectionError``. ``started`` is called once the frame's first bytes are in. The header's
    buffer grows with the bytes that arrive, so a prefix claiming a large header takes no memory.
    """
    view = memoryview(prefix)
    n = _recv_into(sock, view, 0 if started else socket.MSG_WAITALL)
    if n == 0:
        raise Closed
    if started is not None:
        started()
    try:
        if n < len(prefix):
            recv_exact(sock, view[n:])
        (length,) = FRAME_PREFIX.unpack(prefix)
        if not length:
            return None
        if length > MAX_HEADER_BYTES:
            raise BadRequest(f"frame header of {length} bytes")
        header = bytearray(min(length, _HEADER_STEP_BYTES))
        recv_exact(sock, memoryview(header))
        while len(header) < length:
            got = len(header)
            header.extend(bytes(min(length, 2 * got) - got))
            recv_exact(sock, memoryview(header)[got:])
    except TimeoutError as e:
        raise ConnectionError("peer stalled mid-frame") from e
    try:
        return decoder.decode(header)
    except msgspec.DecodeError as e:
        raise BadRequest(f"undecodable frame: {e}") from e


def send_all(sock: Stream, header: bytes, payload: memoryview) -> None:
    """Send a frame header and its payload with as few system calls as possible (no copy in plain TCP)."""
    if isinstance(sock, TlsStream):
        sock.sendall(header, payload)
        return
    buffers: list[bytes | memoryview] = [header, payload] if len(payload) else [header]
    while buffers:
        try:
            sent = sock.sendmsg(buffers)
        except BlockingIOError as e:  # the kernel's send deadline passed with nothing sent
            raise TimeoutError(f"peer not reading for the socket's deadline: {e}") from e
        while sent:
            first = buffers[0]
            if sent >= len(first):
                sent -= len(first)
                buffers.pop(0)
            else:
                buffers[0] = memoryview(first)[sent:]
                sent = 0


def tcp_retransmits(sock: Stream) -> int | None:
    """Segments the kernel retransmitted on ``sock`` since it opened (``tcpi_total_retrans``); None where it does not tell."""
    if _TCP_INFO is None:
        return None
    size = _TOTAL_RETRANS_OFFSET + _TOTAL_RETRANS.size
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, size)
    except OSError:  # not a TCP socket, or closed
        return None
    if len(info) < size:
        return None
    return _TOTAL_RETRANS.unpack_from(info, _TOTAL_RETRANS_OFFSET)[0]
