"""Blocking-socket framing shared by both ends of direct TCP (used from worker threads only)."""

from __future__ import annotations

import socket

import msgspec

from libs.common.errors import BadRequest
from libs.kvwire.format import FRAME_PREFIX, MAX_HEADER_BYTES


class Closed(Exception):
    """The peer closed the connection between frames."""


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from ``sock`` (``ConnectionError`` on EOF; one system call when data is ready)."""
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:], total - got, socket.MSG_WAITALL)
        if n == 0:
            raise ConnectionError("connection closed mid-frame")
        got += n


def read_frame(sock: socket.socket, prefix: bytearray, decoder: msgspec.msgpack.Decoder):
    """Read one frame's header message.

    ``Closed`` on a clean EOF before the frame; ``TimeoutError`` only if nothing of the frame
    arrived within the socket timeout (the stream is still in sync); a stall mid-frame is a
    ``ConnectionError``.
    """
    view = memoryview(prefix)
    n = sock.recv_into(view, len(prefix), socket.MSG_WAITALL)
    if n == 0:
        raise Closed
    try:
        if n < len(prefix):
            recv_exact(sock, view[n:])
        (length,) = FRAME_PREFIX.unpack(prefix)
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
        sent = sock.sendmsg(buffers)
        while sent:
            first = buffers[0]
            if sent >= len(first):
                sent -= len(first)
                buffers.pop(0)
            else:
                buffers[0] = memoryview(first)[sent:]
                sent = 0
