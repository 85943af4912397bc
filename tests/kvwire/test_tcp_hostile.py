"""The KV TCP listener under hostile input: random bytes, manifests and chunks that lie, slow senders and floods are
refused before memory of the claimed size is taken, each counted by reason, while a legitimate transfer on the same
listener completes with the same bytes in comparable time. Admission is the decode gateway's own reservation book."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry

from libs.common.messages import (
    DecodeJob,
    ErrorReply,
    KvBegin,
    KvChunk,
    KvChunkAck,
    KvJoin,
    KvManifest,
    KvResumeState,
    encode,
    kv_receiver_frame_decoder,
)
from libs.common.state_parts import PartSpec, StatePart
from libs.engine.build import BackendSpec, build_backend
from libs.kvwire.assembly import required_bytes
from libs.kvwire.format import FRAME_PREFIX, MAX_HEADER_BYTES, build_manifest, frame
from libs.kvwire.linkstats import KvLinks
from libs.kvwire.receiver import KvReceiver, ReceiverConfig
from libs.kvwire.sender import KvSender
from libs.kvwire.tcp_recv import TcpReceiverServer, TcpServerConfig
from services.decode_gateway.config import DecodeGatewayConfig
from services.decode_gateway.metrics import DecodeGatewayMetrics
from services.decode_gateway.reservations import Reservation, ReservationBook
from tests.kvwire.support import CHUNK, DST, SRC, assert_restored, eventually, tcp_dest, tcp_sender

MODEL = "kimi-linear-1t"
TOKENS = 256
ARENA_BYTES = 64 << 20
HEADER_TIMEOUT_S = 0.3
IO_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 12
BOUNDED_BYTES = 4 << 20  # what the hostile input of a test may cost in Python allocations, all connections together


@dataclass
class _Site:
    """A decode site's KV listener: a reservation book admitting transfers into a receiver, behind a TCP server."""

    book: ReservationBook
    receiver: KvReceiver
    server: TcpReceiverServer
    specs: list[PartSpec]  # what a transfer of TOKENS tokens carries

    async def reserve(self, tid: str) -> Reservation:
        job = DecodeJob(
            request_id=f"r-{tid}",
            transfer_id=tid,
            model=MODEL,
            prompt_tokens=list(range(1, TOKENS + 1)),
            max_tokens=1,
            reply_subject="_INBOX.none",
            prefill_site=SRC,
        )
        res, _ = await self.book.reserve(job, draining=False)
        return res

    def manifest(self, tid: str, specs: list[PartSpec] | None = None) -> KvManifest:
        return build_manifest(
            transfer_id=tid,
            src_site=SRC,
            dst_site=DST,
            model=MODEL,
            block_size=64,
            num_tokens=TOKENS,
            specs=specs or self.specs,
            chunk_bytes=CHUNK,
            request_id=f"r-{tid}",
        )

    def parts(self, seed: int) -> list[StatePart]:
        rng = np.random.default_rng(seed)
        return [
            StatePart(
                s.layer, s.kind, s.name, rng.integers(0, 255, s.nbytes, dtype=np.uint8).view(s.dtype).reshape(s.shape)
            )
            for s in self.specs
        ]

    def refusals(self) -> dict[str, int]:
        reasons = (
            "bad_frame",
            "bad_chunk",
            "transfer_refused",
            "slow_frame",
            "idle",
            "stalled",
            "too_many_connections",
        )
        return {r: self.server.refused(r) for r in reasons if self.server.refused(r)}


@contextlib.asynccontextmanager
async def _site() -> AsyncIterator[_Site]:
    backend = build_backend(BackendSpec(backend="simulated:h20", model=MODEL, byte_scale=0.02))
    config = DecodeGatewayConfig(kv_memory_bytes=ARENA_BYTES, max_transfer_bytes=ARENA_BYTES)
    receiver = KvReceiver(
        ReceiverConfig(max_total_bytes=ARENA_BYTES, max_transfer_bytes=ARENA_BYTES, transfer_timeout_s=30.0),
        admit=lambda manifest, need: book.admit(manifest, need),
    )
    book = ReservationBook(backend, receiver, 16, config, DecodeGatewayMetrics(CollectorRegistry()))
    server_config = TcpServerConfig(
        header_timeout_s=HEADER_TIMEOUT_S, io_timeout_s=IO_TIMEOUT_S, max_connections=MAX_CONNECTIONS
    )
    async with receiver, TcpReceiverServer(receiver, server_config) as server:
        yield _Site(book, receiver, server, backend.plan_parts(TOKENS))


def _visit(address: tuple[str, int], data: bytes, drip_s: float = 0.0, hold: bool = False) -> tuple[list, float]:
    """Send ``data`` (a byte every ``drip_s`` if given), then end the stream unless ``hold``, and read until the
    receiver closes: its frames, and the seconds from the first byte sent to the close."""
    with socket.create_connection(address, timeout=10.0) as sock:
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the receiver may close before everything is sent
            if drip_s:
                for i in range(len(data)):
                    sock.sendall(data[i : i + 1])
                    time.sleep(drip_s)  # the hostile sender's pace
            else:
                sock.sendall(data)
            if not hold:
                sock.shutdown(socket.SHUT_WR)
        answer = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(1 << 16):
                answer += chunk
        elapsed = time.monotonic() - started
    frames = []
    while len(answer) >= FRAME_PREFIX.size:
        (length,) = FRAME_PREFIX.unpack_from(answer)
        frames.append(kv_receiver_frame_decoder.decode(answer[FRAME_PREFIX.size : FRAME_PREFIX.size + length]))
        del answer[: FRAME_PREFIX.size + length]
    return frames, elapsed


async def _visits(address: tuple[str, int], payloads: list[bytes]) -> list[list]:
    """Each payload on its own connection, all at once; the frames each one got back."""
    return [frames for frames, _ in await asyncio.gather(*(asyncio.to_thread(_visit, address, p) for p in payloads))]


def _error(frames: list) -> ErrorReply:
    assert len(frames) == 1 and isinstance(frames[0], ErrorReply), frames
    return frames[0]


async def _peak_bytes_of(action: Callable[[], object]) -> int:
    """Python's peak allocations (every thread) while ``action`` runs, above what was allocated before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        await action()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


async def test_random_bytes_and_undecodable_frames_are_refused_at_the_first_frame_with_a_bounded_buffer(caplog):
    """Random bytes, a prefix claiming a 4 GiB header, garbage msgpack and a frame of the wrong side: all bad frames;
    prefixes claiming the largest header allowed, then stalling, cost what arrived and are cut at the header deadline."""
    rng = random.Random(19)
    garbage = rng.randbytes(1000)
    payloads = [rng.randbytes(256 << 10) for _ in range(4)]
    payloads += [
        FRAME_PREFIX.pack(0xFFFFFFFF) + rng.randbytes(64),
        FRAME_PREFIX.pack(len(garbage)) + garbage,
        frame(encode(KvChunkAck(transfer_id="t-x", part=0, offset=0, ok=True))),
    ]
    async with _site() as site:
        answers: list[list] = []

        stalled = [FRAME_PREFIX.pack(MAX_HEADER_BYTES) + rng.randbytes(100) for _ in range(8)]  # 8 MiB claimed

        async def attack() -> None:
            stalls = [asyncio.to_thread(_visit, site.server.address, p, 0.0, True) for p in stalled]
            results = await asyncio.gather(_visits(site.server.address, payloads), *stalls)
            answers.extend(results[0])
            assert all(frames == [] for frames, _ in results[1:])

        peak = await _peak_bytes_of(attack)
        assert all(_error(a).code == "bad_request" for a in answers)
        await eventually(lambda: site.server.open_connections == 0)
        assert site.refusals() == {"bad_frame": len(payloads), "slow_frame": len(stalled)}
        logged = [r.reason for r in caplog.records if r.getMessage() == "kv connection refused"]
        assert sorted(logged) == ["bad_frame", "slow_frame"]  # one line per reason per LOG_EVERY_S: no flood
        assert site.receiver.used_bytes == 0
        assert peak < BOUNDED_BYTES, peak


async def test_manifests_that_lie_are_refused_before_memory_of_their_size_is_taken():
    """No reservation, more than the reservation, sizes that overflow or disagree, huge chunks: refused, nothing held."""
    async with _site() as site:
        res = await site.reserve("t-liar")
        honest = site.manifest("t-liar")
        first = honest.parts[0]
        big = [msgspec.structs.replace(s, shape=(s.shape[0] * 64,)) if i == 0 else s for i, s in enumerate(site.specs)]
        over = site.manifest("t-liar", big)
        assert res.reserved_bytes < required_bytes(over) < ARENA_BYTES  # fits the arena: only the reservation refuses

        def lying(**changes) -> KvManifest:
            return msgspec.structs.replace(honest, parts=[msgspec.structs.replace(first, **changes), *honest.parts[1:]])

        lies = {
            "has no reservation": msgspec.structs.replace(honest, transfer_id="t-stranger", request_id="r-t-stranger"),
            "over its reservation": over,
            "does not match": lying(shape=[1 << 32, 1 << 32], nbytes=0),  # 2**64 elements wrap to 0 in int64
            "does not match uint8": lying(nbytes=1 << 40),
            "unsupported dtype": lying(shape=[-1], nbytes=-1),
            "outside [4 KiB, 64 MiB]": msgspec.structs.replace(honest, chunk_bytes=1 << 40),
        }
        answers: list[list] = []

        async def attack() -> None:
            answers.extend(
                await _visits(site.server.address, [frame(encode(KvBegin(manifest=m))) for m in lies.values()])
            )

        peak = await _peak_bytes_of(attack)
        for why, answer in zip(lies, answers, strict=True):
            assert why.split(" uint8")[0] in _error(answer).message, (why, answer)
        await eventually(lambda: site.server.open_connections == 0)
        assert site.refusals() == {"transfer_refused": len(lies)}
        assert site.receiver.used_bytes == 0 and site.receiver.active_transfers == 0
        assert peak < BOUNDED_BYTES, peak


async def test_chunks_that_lie_are_refused_before_their_payload_is_read():
    """Chunk headers longer than their layout, past the last chunk, negative or huge: refused at once, payload unsent."""
    async with _site() as site:
        await site.reserve("t-honest")
        zstd = [msgspec.structs.replace(s, codec="zstd") if s.kind == "attn_kv" else s for s in site.specs]
        manifest = site.manifest("t-honest", zstd)  # an encoded part's wire size comes with its first chunk
        encoded = next(i for i, s in enumerate(manifest.parts) if s.codec == "zstd")
        frames, _ = await asyncio.to_thread(_visit, site.server.address, frame(encode(KvBegin(manifest=manifest))))
        assert frames == [KvResumeState(transfer_id="t-honest", complete=False)]
        held = site.receiver.used_bytes
        spec = manifest.parts[0]  # 80,159 bytes: one full chunk and a short last one
        chunk = KvChunk(
            transfer_id="t-honest",
            part=0,
            offset=CHUNK,
            length=spec.nbytes - CHUNK,
            checksum=0,
            part_wire_bytes=spec.nbytes,
        )
        lies = [
            msgspec.structs.replace(chunk, length=chunk.length + 1),  # longer than its place in the part
            msgspec.structs.replace(chunk, length=CHUNK + 1),  # longer than any chunk of the transfer
            msgspec.structs.replace(chunk, offset=2 * CHUNK),  # a chunk past the last one
            msgspec.structs.replace(chunk, offset=-CHUNK),
            msgspec.structs.replace(chunk, part=len(manifest.parts)),  # a part the manifest does not have
            msgspec.structs.replace(chunk, part_wire_bytes=-1),
            msgspec.structs.replace(chunk, length=1 << 40),
            msgspec.structs.replace(chunk, part=encoded, offset=0, length=-5, part_wire_bytes=-5),  # a negative size
        ]
        join = frame(encode(KvJoin(transfer_id="t-honest", conn=1)))
        payloads = [join + frame(encode(lie)) for lie in lies]
        payloads.append(frame(encode(msgspec.structs.replace(chunk, length=1 << 40))))  # joined to no transfer
        answers: list[list] = []

        async def attack() -> None:
            answers.extend(await _visits(site.server.address, payloads))

        peak = await _peak_bytes_of(attack)  # no payload follows: an answer at all means none was awaited
        for lie, answer in zip(lies, answers, strict=False):
            assert isinstance(answer[0], KvResumeState) and _error(answer[1:]).code == "bad_request", (lie, answer)
        assert _error(answers[-1]).code == "bad_request"
        await eventually(lambda: site.server.open_connections == 0)
        assert site.refusals() == {"bad_chunk": len(payloads)}
        assert site.receiver.used_bytes == held and site.receiver.assembly("t-honest").held() == []
        assert peak < BOUNDED_BYTES, peak


async def test_a_slow_sender_is_cut_at_the_header_deadline_and_a_silent_one_at_the_idle_deadline():
    """A begin dripped a byte at a time is cut once its header is HEADER_TIMEOUT_S late; a silent peer after IO_TIMEOUT_S."""
    async with _site() as site:
        await site.reserve("t-slow")
        begin = frame(encode(KvBegin(manifest=site.manifest("t-slow"))))
        (slow, slow_s), (silent, silent_s) = await asyncio.gather(
            asyncio.to_thread(_visit, site.server.address, begin, 0.05, True),
            asyncio.to_thread(_visit, site.server.address, b"", 0.0, True),
        )
        assert slow == [] and silent == []
        # Lower bounds: never cut before the deadline. Upper ones: the deadline plus the watchdog's period and a
        # descheduled thread or two on a loaded 2-core machine (the begin alone would take 5 s to drip).
        assert HEADER_TIMEOUT_S <= slow_s < HEADER_TIMEOUT_S + 1.5, slow_s
        assert IO_TIMEOUT_S <= silent_s < IO_TIMEOUT_S + 1.5, silent_s
        await eventually(lambda: site.server.open_connections == 0)
        assert site.refusals() == {"slow_frame": 1, "idle": 1}
        assert site.receiver.active_transfers == 0


async def test_connections_past_the_cap_are_closed_at_once_and_counted():
    """MAX_CONNECTIONS stay open (until idle); the rest are closed as soon as accepted."""
    extra = 5
    async with _site() as site:
        socks = [socket.create_connection(site.server.address, timeout=5.0) for _ in range(MAX_CONNECTIONS + extra)]
        try:
            await eventually(lambda: site.server.refused("too_many_connections") == extra)
            assert site.server.open_connections == MAX_CONNECTIONS
        finally:
            for sock in socks:
                sock.close()
        await eventually(lambda: site.server.open_connections == 0)


async def test_a_legitimate_transfer_beside_every_attack_completes_with_the_same_bytes_in_comparable_time():
    """On warm connections a transfer restores the same bytes while the listener is flooded, dripped and lied to."""
    async with _site() as site, KvLinks(SRC) as links:
        sender: KvSender = tcp_sender(links, connections=2)
        durations = []
        for tid in ("t-warm", "t-alone", "t-attacked"):
            await site.reserve(tid)
        for tid in ("t-warm", "t-alone"):  # the first one opens the pool's connections
            started = time.monotonic()
            await sender.send(site.manifest(tid), site.parts(1), tcp_dest(site.server))
            durations.append(time.monotonic() - started)
            (await site.receiver.wait(tid, timeout_s=5)).release()
        address = site.server.address
        stop = threading.Event()
        rng = random.Random(5)
        liar = msgspec.structs.replace(site.manifest("t-alone"), transfer_id="t-ghost", request_id="r-t-ghost")

        def hammer(payload: Callable[[], bytes], drip_s: float = 0.0) -> None:
            while not stop.is_set():
                _visit(address, payload(), drip_s, hold=bool(drip_s))

        attackers = [
            lambda: hammer(lambda: rng.randbytes(4096)),
            lambda: hammer(lambda: frame(encode(KvBegin(manifest=liar)))),
            lambda: hammer(lambda: frame(encode(KvBegin(manifest=liar))), drip_s=0.05),
        ]
        tasks = [asyncio.create_task(asyncio.to_thread(a)) for a in attackers]
        flood: list[socket.socket] = []
        try:
            every = ("bad_frame", "transfer_refused", "slow_frame")
            await eventually(lambda: all(site.server.refused(r) for r in every))  # each attack has hit the listener
            flood += [socket.create_connection(address, timeout=5.0) for _ in range(MAX_CONNECTIONS)]
            await eventually(lambda: site.server.refused("too_many_connections") > 0)  # and it is full
            parts = site.parts(2)
            waiter = asyncio.create_task(site.receiver.wait("t-attacked", timeout_s=10))
            started = time.monotonic()
            report = await sender.send(site.manifest("t-attacked"), parts, tcp_dest(site.server))
            attacked_s = time.monotonic() - started
            with await waiter as done:
                assert_restored(parts, done.parts, ["raw"] * len(parts))
        finally:
            stop.set()
            for sock in flood:
                sock.close()
            await asyncio.gather(*tasks)
            await sender.transport.close()
        assert report.attempts == 1 and report.chunks_resent == 0  # its warm connections were never disturbed
        refused = site.refusals()
        assert refused["bad_frame"] > 0 and refused["transfer_refused"] > 0 and refused["too_many_connections"] > 0
        # Upper bound: the attackers' threads share the GIL and both cores with the transfer (ten times the quiet
        # transfer, plus a second of scheduling on a loaded machine); a stalled one would wait IO_TIMEOUT_S or more.
        assert attacked_s < 10 * durations[1] + 1.0, (attacked_s, durations)
