"""Blocking-socket framing shared by both ends of direct TCP (used from worker threads only).

Sockets stay in blocking mode with their deadline kept by the kernel (``SO_RCVTIMEO``,
``SO_SNDTIMEO``): a chunk's payload is one ``recv_into`` with ``MSG_WAITALL`` and one ``sendmsg``.
A Python-level socket timeout would instead make the descriptor non-blocking and put a ``poll``
and a GIL hand-off before every partial read or write. ``tcp_retransmits`` reads what the kernel
counts of a connection (Linux ``TCP_INFO``): a cheap system call, also safe on the event loop.
"""

from __future__ import annotations

import socket
import struct

import msgspec

from libs.common.errors import BadRequest
from libs.kvwire.format import FRAME_PREFIX, MAX_HEADER_BYTES

_TCP_INFO = getattr(socket, "TCP_INFO", None)  # Linux only
_TOTAL_RETRANS = struct.Struct("@I")  # struct tcp_info's tcpi_total_retrans (__u32)
_TOTAL_RETRANS_OFFSET = 100  # after 8 bytes of __u8 fields and 23 __u32 ones (linux/tcp.h, stable ABI)


KEEPALIVE = FRAME_PREFIX.pack(0)  # a frame with an empty header: keeps a quiet connection's window, ignored by readers


class Closed(Exception):
    """The peer closed the connection between frames."""


def set_deadline(sock: socket.socket, timeout_s: float) -> None:
    """Blocking mode, every receive and send bounded by ``timeout_s`` (``TimeoutError`` past it)."""
    sock.settimeout(None)
    seconds = int(timeout_s)
    timeval = struct.pack("@ll", seconds, int((timeout_s - seconds) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _recv_into(sock: socket.socket, view: memoryview) -> int:
    try:
        return sock.recv_into(view, len(view), socket.MSG_WAITALL)
    except BlockingIOError as e:  # the kernel's receive deadline passed with nothing read
        raise TimeoutError(f"no data for the socket's deadline: {e}") from e


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (``ConnectionError`` on EOF; one system call unless the deadline cuts it)."""
    got = 0
    total = len(view)
    while got < total:
        n = _recv_into(sock, view[got:])
        if n == 0:
            raise ConnectionError("connection closed mid-frame")
        got += n


def read_frame(sock: socket.socket, prefix: bytearray, decoder: msgspec.msgpack.Decoder):
    """Read one frame's header message (None for a ``KEEPALIVE``).

    ``Closed`` on a clean EOF before the frame; ``TimeoutError`` only if nothing of the frame
    arrived within the socket timeout (the stream is still in sync); a stall mid-frame is a
    ``ConnectionError``.
    """
    view = memoryview(prefix)
    n = _recv_into(sock, view)
    if n == 0:
        raise Closed
    try:
        if n < len(prefix):
            recv_exact(sock, view[n:])
        (length,) = FRAME_PREFIX.unpack(prefix)
        if not length:
            return None
        if length > MAX_HEADER_BYTES:
            raise BadRequest(f"frame header of {length} bytes")
        header = bytearray(length)
        recv_exact(sock, memoryview(header))
    except TimeoutError as e:
        raise ConnectionError("peer stalled mid-frame") from e
    try:
        return decoder.decode(header)
    except msgspec.DecodeError as e:
        raise BadRequest(f"undecodable frame: {e}") from e


def send_all(sock: socket.socket, header: bytes, payload: memoryview) -> None:
    """Send a frame header and its payload with as few system calls as possible (no copy)."""
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


def tcp_retransmits(sock: socket.socket) -> int | None:
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
