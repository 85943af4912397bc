"""Processes of ``prfaas bench kv``: the synthetic transfer, the receiver and sender processes, the baselines.

The bench only orchestrates: every byte moves between spawned processes driven over pipes.
Receiver: ``("wait", ids)`` answers with every restored part's checksum per transfer and the
kernel's count of bytes received over time (``TCP_INFO``, so a starved process cannot blur it);
``("raw", nbytes, connections)`` and ``("core", subject, nbytes)`` receive a baseline. Given
certificate files, the receiver also listens with mutual TLS (a second port), where the sender sends
on ``("send", id, True)``. Sender: ``("send", id)``, ``("raw", port, connections, chunk)``,
``("core", subject, chunk, window)``.
Both end on ``("stop",)`` or when the bench's end of the pipe closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import nats
import numpy as np

from libs.common.bus import connect, settle
from libs.common.pki import CertFiles, client_context, server_context
from libs.common.state_parts import PartSpec, StatePart
from libs.common.telemetry import setup_logging
from libs.kvwire.format import DEFAULT_CHECKSUM, checksum_fn
from libs.kvwire.js_recv import JetStreamReceiver
from libs.kvwire.js_send import JetStreamConfig, JetStreamTransport
from libs.kvwire.link import LinkConfig
from libs.kvwire.linkstats import KvLinks
from libs.kvwire.receiver import KvReceiver, ReceiverConfig
from libs.kvwire.sender import Destination, KvSender
from libs.kvwire.sockets import recv_exact, set_deadline
from libs.kvwire.tcp_recv import TcpReceiverServer, TcpServerConfig
from libs.kvwire.tcp_send import TcpConfig, TcpTransport

SRC_SITE, DST_SITE, INSTANCE = "dc-prfaas", "dc-pd", "bench-decode"
LINEAR_LAYERS = 2
ATTN_LAYERS = 8
LINEAR_STATE_SHAPE = (8, 128, 128)  # float32 recurrent state per linear layer (512 KiB)
KV_HEADS, HEAD_DIM = 8, 128  # float16 K and V per attention layer and token
CORE_CREDIT_EVERY = 8  # the core-NATS sink grants credit every this many messages
DEADLINE_S = 120.0
WIRE_SAMPLE_S = 0.01
ACKED_SAMPLE_S = 0.05
_RAW_HELLO = struct.Struct("<IIIQ")  # connection index, connections, chunk bytes, total bytes


def synthetic_parts(size_bytes: int, codec: str) -> tuple[list[PartSpec], list[StatePart]]:
    """A hybrid model's transfer of about ``size_bytes``: 2 linear layers' state and 8 layers' K/V."""
    linear_bytes = LINEAR_LAYERS * int(np.prod(LINEAR_STATE_SHAPE)) * 4
    per_token = ATTN_LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
    tokens = max(1, (size_bytes - linear_bytes) // per_token)
    base = np.random.default_rng(0).standard_normal(2 << 20).astype(np.float16).view(np.uint8)
    parts: list[StatePart] = []
    specs: list[PartSpec] = []
    for layer in range(LINEAR_LAYERS + ATTN_LAYERS):
        if layer < LINEAR_LAYERS:
            arrays = [("state", "linear_state", np.empty(LINEAR_STATE_SHAPE, dtype=np.float32))]
        else:
            arrays = [(n, "attn_kv", np.empty((tokens, KV_HEADS, HEAD_DIM), dtype=np.float16)) for n in ("k", "v")]
        for name, kind, array in arrays:
            flat = array.reshape(-1).view(np.uint8)
            for offset in range(0, len(flat), len(base)):
                piece = flat[offset : offset + len(base)]
                piece[:] = base[: len(piece)]
            part = StatePart(layer, kind, name, array)
            parts.append(part)
            specs.append(PartSpec.of(part, codec if kind == "attn_kv" else "raw"))
    return specs, parts


def part_checksums(parts: list[StatePart], algo: str) -> list[int]:
    """Checksum of every part's array bytes (to prove the receiver restored the same bytes)."""
    fn = checksum_fn(algo)
    return [fn(memoryview(p.array.reshape(-1).view(np.uint8))) for p in parts]


def busy_process(deadline_s: float) -> None:
    """A CPU hog: spin until ``deadline_s`` has passed or the bench is gone."""
    parent = os.getppid()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and os.getppid() == parent:
        for _ in range(100_000):
            pass


def _log_to(log_path: Path) -> None:
    """Send this process's stderr (its log records and any traceback) to ``log_path``."""
    stream = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(stream.fileno(), 2)
    sys.stderr = stream
    setup_logging("INFO")


# --- baselines ---------------------------------------------------------------------------------


def raw_sockets_source(port: int, payload: memoryview, connections: int, chunk_bytes: int) -> float:
    """Direct TCP's baseline, same shape: ``payload`` striped in ``chunk_bytes`` over ``connections``
    blocking sockets (a thread each, kernel deadlines as kvwire's) to the receiver process, which
    ``recv_into``s a touched buffer and answers one byte per connection; Gbps from the first connect
    to the last answer."""
    errors: list[BaseException] = []

    def send(index: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
                set_deadline(sock, DEADLINE_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.sendall(_RAW_HELLO.pack(index, connections, chunk_bytes, len(payload)))
                for offset in range(index * chunk_bytes, len(payload), connections * chunk_bytes):
                    sock.sendall(payload[offset : offset + chunk_bytes])
                if sock.recv(1) != b"k":
                    raise ConnectionError("raw sockets baseline: no answer from the receiver")
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=send, args=(i,), name=f"raw-send-{i}") for i in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return len(payload) * 8 / elapsed / 1e9


def _raw_sockets_sink(listener: socket.socket, sink: np.ndarray, connections: int) -> None:
    """The receiving end of ``raw_sockets_source`` (blocking: run it in a worker thread)."""
    view = memoryview(sink)
    errors: list[BaseException] = []

    def serve(conn: socket.socket) -> None:
        try:
            with conn:
                hello = bytearray(_RAW_HELLO.size)
                recv_exact(conn, memoryview(hello))
                index, count, chunk_bytes, total = _RAW_HELLO.unpack(hello)
                for offset in range(index * chunk_bytes, total, count * chunk_bytes):
                    recv_exact(conn, view[offset : min(offset + chunk_bytes, total)])
                conn.sendall(b"k")
        except BaseException as e:
            errors.append(e)

    threads = []
    for i in range(connections):
        conn, _ = listener.accept()
        set_deadline(conn, DEADLINE_S)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threads.append(threading.Thread(target=serve, args=(conn,), name=f"raw-recv-{i}"))
        threads[-1].start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


async def core_nats_source(nc, subject: str, payload: memoryview, chunk_bytes: int, window: int) -> float:
    """Publish ``payload`` in chunks with at most ``window`` unconfirmed messages; Gbps to the sink."""
    await _wait_responder(nc, subject + ".ready")
    credits = asyncio.Semaphore(window)
    done = asyncio.Event()

    async def on_credit(msg) -> None:
        if msg.data == b"done":
            done.set()
        for _ in range(CORE_CREDIT_EVERY):
            credits.release()

    sub = await nc.subscribe(subject + ".credit", cb=on_credit)
    await settle(nc)
    started = time.perf_counter()
    for offset in range(0, len(payload), chunk_bytes):
        await credits.acquire()
        await nc.publish(subject, payload[offset : offset + chunk_bytes])
    async with asyncio.timeout(DEADLINE_S):
        await done.wait()
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return len(payload) * 8 / elapsed / 1e9


async def _wait_responder(nc, subject: str) -> None:
    """Until a request on ``subject`` is answered (interest crossed the gateway)."""
    async with asyncio.timeout(30.0):
        while True:
            try:
                await nc.request(subject, b"", timeout=0.5)
                return
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                await asyncio.sleep(0.1)


async def _core_sink(nc, subject: str, nbytes: int) -> None:
    got = 0
    count = 0
    done = asyncio.Event()

    async def on_data(msg) -> None:
        nonlocal got, count
        got += len(msg.data)
        count += 1
        if got >= nbytes:
            await nc.publish(subject + ".credit", b"done")
            done.set()
        elif count % CORE_CREDIT_EVERY == 0:
            await nc.publish(subject + ".credit", b"")

    async def on_ready(msg) -> None:
        await msg.respond(b"")

    data = await nc.subscribe(subject, cb=on_data, pending_bytes_limit=1 << 30)
    ready = await nc.subscribe(subject + ".ready", cb=on_ready)
    await settle(nc)
    async with asyncio.timeout(DEADLINE_S):
        await done.wait()
    await data.unsubscribe()
    await ready.unsubscribe()


# --- the receiver process ----------------------------------------------------------------------


class WireSampler:
    """A thread sampling a server's ``wire_bytes_received``: ``(monotonic s, bytes)`` pairs."""

    def __init__(self, server: TcpReceiverServer, period_s: float = WIRE_SAMPLE_S) -> None:
        self.server = server
        self.period_s = period_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wire-sampler", daemon=True)

    def __enter__(self) -> WireSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            before = time.monotonic()
            received = self.server.wire_bytes_received()
            after = time.monotonic()
            if after - before < 0.002:  # a reading that was interrupted has no exact time: drop it
                self.samples.append(((before + after) / 2, received))


def receiver_process(
    pipe: Connection, transport: str, capacity_bytes: int, nats_url: str, log_path: Path, tls: CertFiles | None = None
) -> None:
    """Entry point of the receiver process (``tls``: also a mutual-TLS listener)."""
    _log_to(log_path)
    asyncio.run(_receiver_main(pipe, transport, capacity_bytes, nats_url, tls))


async def _receiver_main(
    pipe: Connection, transport: str, capacity_bytes: int, nats_url: str, tls: CertFiles | None
) -> None:
    config = ReceiverConfig(
        max_total_bytes=capacity_bytes, max_transfer_bytes=capacity_bytes, prefault=True, transfer_timeout_s=DEADLINE_S
    )
    nc = await connect(nats_url, name=f"bench-{INSTANCE}") if transport == "jetstream" else None
    sink = np.empty(0, dtype=np.uint8)
    async with KvReceiver(config) as receiver:
        if transport == "tcp":
            server = TcpReceiverServer(receiver)
        else:
            server = JetStreamReceiver(nc, receiver, DST_SITE, INSTANCE)
        secure = TcpReceiverServer(receiver, TcpServerConfig(tls=server_context(tls))) if tls is not None else None
        with socket.create_server(("127.0.0.1", 0)) as raw_listener:
            await server.start()
            if secure is not None:
                await secure.start()
            ports = (server.address[1] if transport == "tcp" else 0, raw_listener.getsockname()[1])
            pipe.send(("ready", *ports, secure.address[1] if secure is not None else 0))
            try:
                while True:
                    try:
                        command = await asyncio.to_thread(pipe.recv)
                    except EOFError:
                        return
                    if command[0] == "stop":
                        return
                    if command[0] == "wait":
                        pipe.send(("done", *await _receive(receiver, server, command[1])))
                    elif command[0] == "raw":
                        _, nbytes, connections = command
                        if len(sink) < nbytes:
                            sink = np.empty(nbytes, dtype=np.uint8)
                            sink[::4096] = 0  # touched, as the receiver's arena is
                        pipe.send(("listening",))
                        await asyncio.to_thread(_raw_sockets_sink, raw_listener, sink, connections)
                        pipe.send(("done",))
                    elif command[0] == "core":
                        await _core_sink(nc, command[1], command[2])
                        pipe.send(("done",))
            finally:
                await server.stop()
                if secure is not None:
                    await secure.stop()
                if nc is not None:
                    await nc.close()


async def _receive(receiver: KvReceiver, server, transfer_ids: list[str]) -> tuple[dict, list]:
    """Wait for every transfer; the checksums of their parts and the wire samples meanwhile."""
    sums: dict[str, list[int]] = {}

    async def one(tid: str) -> None:
        with await receiver.wait(tid, DEADLINE_S) as done:
            sums[tid] = part_checksums(done.parts, DEFAULT_CHECKSUM)

    if isinstance(server, TcpReceiverServer):
        with WireSampler(server) as sampler:
            await asyncio.gather(*(one(tid) for tid in transfer_ids))
        return sums, sampler.samples
    await asyncio.gather(*(one(tid) for tid in transfer_ids))
    return sums, []


# --- the sender process ------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderSpec:
    """What a sender process sends, how, and where."""

    transport: str
    size_bytes: int
    codec: str
    budget_gbps: float
    connections: int
    chunk_bytes: int
    nats_url: str  # "" without NATS
    port: int  # the receiver's TCP port
    log_path: Path
    tls: CertFiles | None = None  # the sender's certificate files: it also sends over mutual TLS
    tls_port: int = 0  # the receiver's mutual-TLS port


def sender_process(pipe: Connection, spec: SenderSpec) -> None:
    """Entry point of a sender process."""
    _log_to(spec.log_path)
    asyncio.run(_sender_main(pipe, spec))


async def _sender_main(pipe: Connection, spec: SenderSpec) -> None:
    specs, parts = synthetic_parts(spec.size_bytes, spec.codec)
    nc = await connect(spec.nats_url, name=f"bench-sender-{os.getpid()}") if spec.nats_url else None
    secure: TcpTransport | None = None
    if spec.transport == "tcp":
        config = TcpConfig(connections=spec.connections, chunk_bytes=spec.chunk_bytes)
        transport = TcpTransport(config)
        dest = Destination(DST_SITE, INSTANCE, "127.0.0.1", spec.port)
        if spec.tls is not None:
            secure = TcpTransport(dataclasses.replace(config, tls=client_context(spec.tls)))
    else:
        transport = JetStreamTransport(nc, JetStreamConfig(chunk_bytes=spec.chunk_bytes))
        dest = Destination(DST_SITE, INSTANCE)
    payload: memoryview | None = None
    try:
        config = LinkConfig(default_budget_gbps=spec.budget_gbps)
        async with KvLinks(SRC_SITE, config, nc=nc) as links:
            sender = KvSender(transport, links)
            secure_sender = KvSender(secure, links) if secure is not None else None
            secure_dest = Destination(DST_SITE, INSTANCE, "127.0.0.1", spec.tls_port)
            if nc is not None:  # measure shares, not the start-up hold of a process that just joined its site
                await asyncio.sleep(config.share_hold_intervals * config.share_interval_s)
            pipe.send(("ready", part_checksums(parts, DEFAULT_CHECKSUM), sender.chunk_bytes(DST_SITE)))
            while True:
                try:
                    command = await asyncio.to_thread(pipe.recv)
                except EOFError:
                    return
                if command[0] == "stop":
                    return
                if command[0] == "send":
                    tid, tls = command[1], command[2:] == (True,)
                    if tls and secure_sender is not None:
                        pipe.send(("done", await _send(secure_sender, links, specs, parts, secure_dest, tid)))
                    else:
                        pipe.send(("done", await _send(sender, links, specs, parts, dest, tid)))
                    continue
                if payload is None:  # baselines carry every part's bytes back to back
                    payload = memoryview(np.concatenate([p.array.reshape(-1).view(np.uint8) for p in parts]))
                if command[0] == "raw":
                    _, port, connections, chunk = command
                    pipe.send(("done", await asyncio.to_thread(raw_sockets_source, port, payload, connections, chunk)))
                elif command[0] == "core":
                    _, subject, chunk, window = command
                    pipe.send(("done", await core_nats_source(nc, subject, payload, chunk, window)))
    finally:
        if nc is not None:
            await nc.close()


async def _send(sender: KvSender, links: KvLinks, specs, parts, dest: Destination, transfer_id: str) -> dict:
    """One transfer; its report, its start and end (monotonic s) and the acknowledged bytes over time."""
    manifest = sender.manifest(
        transfer_id=transfer_id,
        dst_site=DST_SITE,
        model="synthetic",
        block_size=64,
        num_tokens=parts[-1].array.shape[0],
        specs=specs,
    )
    sampler = asyncio.create_task(_sample_acked(links))
    started = time.monotonic()
    try:
        report = await sender.send(manifest, parts, dest)
    finally:
        ended = time.monotonic()
        sampler.cancel()
        samples = await sampler
    return {
        "goodput_gbps": report.goodput_gbps,
        "duration_s": report.duration_s,
        "payload_bytes": report.payload_bytes,
        "wire_bytes": report.wire_bytes,
        "chunks_sent": report.chunks_sent,
        "chunks_resent": report.chunks_resent,
        "started": started,
        "ended": ended,
        "acked_samples": samples,
    }


async def _sample_acked(links: KvLinks) -> list[tuple[float, int]]:
    """(monotonic s, bytes acknowledged) every ``ACKED_SAMPLE_S`` until cancelled."""
    counters = links.link(DST_SITE).counters
    samples: list[tuple[float, int]] = []
    try:
        while True:
            samples.append((time.monotonic(), counters.acked_bytes_total))
            await asyncio.sleep(ACKED_SAMPLE_S)
    except asyncio.CancelledError:
        samples.append((time.monotonic(), counters.acked_bytes_total))
        return samples
