"""Helpers of the kvwire tests: hybrid part sets, a TCP proxy that corrupts or cuts, receivers."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
from collections.abc import AsyncIterator, Callable

import numpy as np

from libs.common.state_parts import PartSpec, StatePart
from libs.kvwire.codecs import INT8_GROUP_ELEMS
from libs.kvwire.linkstats import KvLinks
from libs.kvwire.receiver import Admission, KvReceiver, ReceiverConfig
from libs.kvwire.sender import Destination, KvSender
from libs.kvwire.tcp_recv import TcpReceiverServer
from libs.kvwire.tcp_send import TcpConfig, TcpTransport

SRC, DST = "dc-prfaas", "dc-pd"
CHUNK = 64 << 10  # small chunks: many of them even in small test transfers


def tcp_sender(links: KvLinks, connections: int = 4, **tcp) -> KvSender:
    """A direct-TCP sender with test-sized chunks."""
    return KvSender(TcpTransport(TcpConfig(connections=connections, chunk_bytes=CHUNK, **tcp)), links)


async def eventually(predicate: Callable[[], object], timeout_s: float = 10.0, poll_s: float = 0.01) -> None:
    """Poll ``predicate`` (sync or async) until true; ``TimeoutError`` after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            # Polls state owned by socket threads or by a NATS server: there is no event to await.
            await asyncio.sleep(poll_s)


def hybrid_parts(seed: int, tokens: int = 512, attn_layers: int = 2) -> list[StatePart]:
    """Two linear layers (float32 state) and ``attn_layers`` layers of float16 K and V."""
    rng = np.random.default_rng(seed)
    parts = [StatePart(i, "linear_state", "state", rng.standard_normal((2, 32, 32), dtype=np.float32)) for i in (0, 1)]
    for layer in range(2, 2 + attn_layers):
        for name in ("k", "v"):
            parts.append(StatePart(layer, "attn_kv", name, rng.standard_normal((tokens, 2, 64)).astype(np.float16)))
    return parts


def specs_of(parts: list[StatePart], attn_codec: str = "raw") -> list[PartSpec]:
    """Specs with ``attn_codec`` for attn_kv parts and raw linear state."""
    return [PartSpec.of(p, attn_codec if p.kind == "attn_kv" else "raw") for p in parts]


def int8_bound(original: np.ndarray) -> np.ndarray:
    """The int8 codec's stated per-element bound: absmax(group) / 254, plus output rounding."""
    flat = original.reshape(-1).astype(np.float64)
    groups = -(-flat.size // INT8_GROUP_ELEMS)
    padded = np.zeros(groups * INT8_GROUP_ELEMS)
    padded[: flat.size] = np.abs(flat)
    absmax = np.repeat(padded.reshape(groups, INT8_GROUP_ELEMS).max(axis=1), INT8_GROUP_ELEMS)[: flat.size]
    info = np.finfo(original.dtype)
    # rounding to the output dtype: relative for normal values, its subnormal spacing below (float16 from 6e-5)
    return (absmax / 254 * (1 + 1e-5) + np.abs(flat) * info.eps + info.smallest_subnormal).reshape(original.shape)


def assert_restored(sent: list[StatePart], received: list[StatePart], codecs: list[str]) -> None:
    """Lossless parts byte for byte; int8 parts within the stated bound."""
    assert [p.key for p in received] == [p.key for p in sent]
    for a, b, codec in zip(sent, received, codecs, strict=True):
        assert b.array.dtype == a.array.dtype and b.array.shape == a.array.shape, a.key
        if codec == "int8":
            err = np.abs(b.array.astype(np.float64) - a.array.astype(np.float64))
            assert (err <= int8_bound(a.array)).all(), a.key
        else:
            assert a.array.tobytes() == b.array.tobytes(), a.key


@contextlib.asynccontextmanager
async def tcp_receiver(
    config: ReceiverConfig | None = None, admit: Admission | None = None
) -> AsyncIterator[tuple[KvReceiver, TcpReceiverServer]]:
    """A started receiver (with an optional admission check) and TCP server on a free loopback port."""
    receiver = KvReceiver(config or ReceiverConfig(max_total_bytes=64 << 20, transfer_timeout_s=30.0), admit)
    async with receiver, TcpReceiverServer(receiver) as server:
        yield receiver, server


def tcp_dest(server: TcpReceiverServer | Proxy) -> Destination:
    """The destination of a server (or of a proxy in front of it)."""
    host, port = server.address
    return Destination(DST, "decode-0", host, port)


class Proxy:
    """A loopback TCP proxy that can flip one bit, cut every connection once, or forget its connections."""

    def __init__(self, upstream: tuple[str, int], flip_at: int | None = None, cut_after: int | None = None) -> None:
        self.upstream = upstream
        self.flip_at = flip_at  # offset in the first connection's client-to-server bytes
        self.cut_after = cut_after  # client-to-server bytes over all connections, then cut them all
        self.forwarded = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []  # open now (cut_all resets them)
        self._pairs: list[tuple[socket.socket, socket.socket]] = []  # (client, upstream) open now
        self._forgotten: set[socket.socket] = set()  # clients whose upstream was dropped (forget_all)
        self._all: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._accepted = 0
        self.address = self._listener.getsockname()[:2]
        self._start(self._accept_loop)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():  # close() closed the listener under us
                    return
                raise
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, server]
                self._pairs.append((client, server))
                self._all += [client, server]
                first = self._accepted == 0
                self._accepted += 1
            self._start(self._pump, client, server, first)
            self._start(self._pump, server, client, False, False)

    def _pump(self, src: socket.socket, dst: socket.socket, first: bool, upstream: bool = True) -> None:
        offset = 0
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if upstream and src in self._forgotten:
                    self._forgotten.discard(src)  # a middlebox without state for the connection resets it
                    self._reset(src)
                    return
                if not data:
                    if not upstream and dst in self._forgotten:
                        return  # the client hears nothing of its upstream's end
                    break
                if upstream and first and self.flip_at is not None and offset <= self.flip_at < offset + len(data):
                    data[self.flip_at - offset] ^= 0x10
                    self.flip_at = None
                offset += len(data)
                dst.sendall(data)
                if upstream:
                    with self._lock:
                        self.forwarded += len(data)
                        cut = self.cut_after is not None and self.forwarded >= self.cut_after
                        if cut:
                            self.cut_after = None
                            self.cuts += 1
                    if cut:
                        self.cut_all()
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                if sock not in self._forgotten:  # a forgotten client learns nothing until it sends
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

    def forget_all(self) -> None:
        """Drop every connection's upstream; each client hears nothing until it sends, then gets a reset."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self._forgotten.update(client for client, _ in pairs)
        for _, server in pairs:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.shutdown(socket.SHUT_RDWR)

    def cut_all(self) -> None:
        """Reset every connection open now."""
        with self._lock:
            socks, self._socks, self._pairs = self._socks, [], []
        for sock in socks:
            self._reset(sock)

    def close(self) -> None:
        """Stop accepting, cut everything, join the threads."""
        self._stop.set()
        self.cut_all()
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)
        for sock in self._all:
            sock.close()
