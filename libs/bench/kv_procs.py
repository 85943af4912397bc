"""Pieces of ``prfaas bench kv``: the synthetic transfer, the receiver process and the baselines.

The receiver runs in its own process (spawned) and is driven over a pipe: ``("wait", id)``
answers with the checksum of every restored part; ``("core", subject, nbytes)`` receives that
many bytes of plain NATS publish/subscribe; ``("stop",)`` ends it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from multiprocessing.connection import Connection

import nats
import numpy as np

from libs.common.bus import connect
from libs.common.state_parts import PartSpec, StatePart
from libs.kvwire.format import checksum_fn
from libs.kvwire.js_recv import JetStreamReceiver
from libs.kvwire.receiver import KvReceiver, ReceiverConfig
from libs.kvwire.tcp_recv import TcpReceiverServer

LINEAR_LAYERS = 2
ATTN_LAYERS = 8
LINEAR_STATE_SHAPE = (8, 128, 128)  # float32 recurrent state per linear layer (512 KiB)
KV_HEADS, HEAD_DIM = 8, 128  # float16 K and V per attention layer and token
CORE_CREDIT_EVERY = 8  # the core-NATS sink grants credit every this many messages
DEADLINE_S = 120.0


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


def raw_loopback_gbps(size_bytes: int, chunk_bytes: int = 4 << 20) -> float:
    """Blocking ``sendall``/``recv_into`` between two threads over loopback, preallocated buffers."""
    source = np.ones(size_bytes, dtype=np.uint8)
    sink = np.zeros(size_bytes, dtype=np.uint8)
    sink[::4096] = 1  # touch every page, as the receiver's arena is
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def receive() -> None:
            conn, _ = listener.accept()
            with conn:
                view = memoryview(sink)
                got = 0
                while got < size_bytes:
                    n = conn.recv_into(view[got:], min(chunk_bytes, size_bytes - got), socket.MSG_WAITALL)
                    if n == 0:
                        raise ConnectionError("baseline receiver: early EOF")
                    got += n

        thread = threading.Thread(target=receive)
        started = time.perf_counter()
        thread.start()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            view = memoryview(source)
            for offset in range(0, size_bytes, chunk_bytes):
                sock.sendall(view[offset : offset + chunk_bytes])
        thread.join()
        return size_bytes * 8 / (time.perf_counter() - started) / 1e9


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
    await nc.flush()
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
    await nc.flush()
    async with asyncio.timeout(DEADLINE_S):
        await done.wait()
    await data.unsubscribe()
    await ready.unsubscribe()


def receiver_process(pipe: Connection, transport: str, capacity_bytes: int, nats_url: str, site: str,
                     instance: str) -> None:
    """Entry point of the receiver process."""
    asyncio.run(_receiver_main(pipe, transport, capacity_bytes, nats_url, site, instance))


async def _receiver_main(pipe: Connection, transport: str, capacity_bytes: int, nats_url: str, site: str,
                         instance: str) -> None:
    config = ReceiverConfig(max_total_bytes=capacity_bytes, max_transfer_bytes=capacity_bytes, prefault=True,
                            transfer_timeout_s=DEADLINE_S)
    nc = await connect(nats_url, name=f"bench-{instance}") if nats_url else None
    async with KvReceiver(config) as receiver:
        if transport == "tcp":
            server = TcpReceiverServer(receiver)
            await server.start()
            pipe.send(("ready", server.address[1]))
        else:
            server = JetStreamReceiver(nc, receiver, site, instance)
            await server.start()
            pipe.send(("ready", 0))
        try:
            while True:
                command = await asyncio.to_thread(pipe.recv)
                if command[0] == "stop":
                    return
                if command[0] == "wait":
                    with await receiver.wait(command[1], DEADLINE_S) as done:
                        sums = part_checksums(done.parts, done.manifest.checksum)
                    pipe.send(("done", sums))
                elif command[0] == "core":
                    await _core_sink(nc, command[1], command[2])
                    pipe.send(("done", None))
        finally:
            await server.stop()
            if nc is not None:
                await nc.close()
