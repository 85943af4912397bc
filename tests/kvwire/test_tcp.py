"""Direct TCP transfers: round trip, corruption, broken connections, restarts, abort, memory limits."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from libs.common.errors import BadRequest, NoCapacity, TransferFailed
from libs.common.state_parts import StatePart
from libs.kvwire.codecs import encode
from libs.kvwire.linkstats import KvLinks
from libs.kvwire.receiver import ReceiverConfig
from libs.kvwire.sender import KvSender
from tests.kvwire.support import (
    CHUNK,
    DST,
    SRC,
    Proxy,
    assert_restored,
    eventually,
    hybrid_parts,
    specs_of,
    tcp_dest,
    tcp_receiver,
)
from tests.kvwire.support import tcp_sender as _sender


def _manifest(sender: KvSender, tid: str, parts: list[StatePart], attn_codec: str = "raw"):
    return sender.manifest(
        transfer_id=tid,
        dst_site=DST,
        model="ref",
        block_size=64,
        num_tokens=parts[-1].array.shape[0],
        specs=specs_of(parts, attn_codec),
    )


async def _layers(parts: list[StatePart], stop_after: int | None = None, gate: asyncio.Event | None = None):
    """Yield parts one layer at a time; after ``stop_after`` parts, wait for ``gate`` (never set: hang)."""
    for i, part in enumerate(parts):
        if stop_after is not None and i == stop_after:
            await (gate or asyncio.Event()).wait()
        await asyncio.sleep(0)
        yield part


@pytest.mark.parametrize("codec", ["raw", "zstd", "int8"])
async def test_layerwise_round_trip_restores_every_part(codec):
    """Parts streamed layer by layer arrive complete: lossless codecs exact, int8 within its bound."""
    parts = hybrid_parts(seed=1)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        sender = _sender(links)
        manifest = _manifest(sender, f"t-rt-{codec}", parts, codec)
        waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=10))
        report = await sender.send(manifest, _layers(parts), tcp_dest(server))
        with await waiter as done:
            assert done.manifest == manifest
            assert_restored(parts, done.parts, [s.codec for s in manifest.parts])
            assert receiver.used_bytes > 0
        assert receiver.used_bytes == 0  # released right after use
        assert report.attempts == 1 and report.chunks_resent == 0 and report.skipped_bytes == 0
        assert report.payload_bytes == sum(p.nbytes for p in parts)
        stats = links.link(DST).stats()
        assert stats.acked_bytes_total == report.wire_bytes and stats.bytes_in_flight == 0
        assert stats.transfers_completed_total == 1 and stats.rtt_s > 0


async def test_flipped_bit_is_detected_and_the_chunk_resent():
    """A bit flipped on the wire fails the chunk's checksum; the receiver rejects it and the sender resends it."""
    parts = hybrid_parts(seed=2)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        proxy = Proxy(server.address, flip_at=20_000)  # inside the first chunk, after the begin frame
        try:
            sender = _sender(links, connections=1)
            manifest = _manifest(sender, "t-flip", parts)
            waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=10))
            report = await sender.send(manifest, parts, tcp_dest(proxy))
            with await waiter as done:
                assert_restored(parts, done.parts, ["raw"] * len(parts))
        finally:
            proxy.close()
        assert proxy.flip_at is None  # the flip happened
        assert receiver.totals.bad_chunks == 1
        assert report.chunks_resent == 1 and report.attempts == 1
        assert links.link(DST).counters.retransmitted_chunks_total == 1


async def test_cut_connections_resume_without_resending_acknowledged_chunks():
    """Every connection reset mid-transfer: the sender reconnects and sends only what the receiver lacks."""
    parts = hybrid_parts(seed=3, tokens=2048)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        wire = sum(p.nbytes for p in parts)
        proxy = Proxy(server.address, cut_after=wire // 2)
        try:
            sender = _sender(links, window_bytes=8 * CHUNK)
            manifest = _manifest(sender, "t-cut", parts)
            waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=20))
            report = await sender.send(manifest, parts, tcp_dest(proxy))
            with await waiter as done:
                assert_restored(parts, done.parts, ["raw"] * len(parts))
        finally:
            proxy.close()
        assert proxy.cuts == 1 and report.attempts == 2
        assert receiver.totals.duplicate_chunks == 0  # nothing the receiver held was sent again
        total_chunks = sum(-(-p.nbytes // CHUNK) for p in parts)
        # Only chunks in flight at the cut (at most the window) can go twice.
        assert total_chunks <= report.chunks_sent <= total_chunks + 8


async def test_restarted_sender_resumes_where_the_first_stopped():
    """A new sender with the same manifest skips every chunk the receiver verified from the first one."""
    parts = hybrid_parts(seed=4)
    half = len(parts) // 2
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        first = _sender(links)
        manifest = _manifest(first, "t-restart", parts)
        dest = tcp_dest(server)
        task = asyncio.create_task(first.send(manifest, _layers(parts, stop_after=half), dest))
        first_half_bytes = sum(p.nbytes for p in parts[:half])
        await eventually(lambda: links.link(DST).counters.acked_bytes_total >= first_half_bytes)
        task.cancel()  # the prefill gateway dies
        with pytest.raises(asyncio.CancelledError):
            await task
        waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=10))
        report = await _sender(links).send(manifest, parts, dest)
        with await waiter as done:
            assert_restored(parts, done.parts, ["raw"] * len(parts))
        assert report.skipped_bytes == first_half_bytes
        assert report.chunks_sent == sum(-(-p.nbytes // CHUNK) for p in parts[half:])
        assert receiver.totals.duplicate_chunks == 0


async def test_restart_with_different_data_fails_the_part_check():
    """Resuming with bytes that differ from what the receiver holds fails the transfer instead of mixing them."""
    parts = hybrid_parts(seed=5)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        first = _sender(links)
        manifest = _manifest(first, "t-mixed", parts)
        task = asyncio.create_task(first.send(manifest, _layers(parts, stop_after=2), tcp_dest(server)))
        await eventually(lambda: links.link(DST).counters.acked_bytes_total >= parts[0].nbytes + parts[1].nbytes)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        changed = [StatePart(p.layer, p.kind, p.name, p.array + 1) for p in parts]
        with pytest.raises(TransferFailed, match="digest"):
            await _sender(links).send(manifest, changed, tcp_dest(server))
        assert receiver.used_bytes == 0


async def test_abort_frees_receiver_memory():
    """An explicit abort drops the transfer: memory back to zero, the waiter fails, a resend is refused."""
    parts = hybrid_parts(seed=6)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        sender = _sender(links)
        manifest = _manifest(sender, "t-abort", parts)
        dest = tcp_dest(server)
        waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=10))
        task = asyncio.create_task(sender.send(manifest, _layers(parts, stop_after=3), dest))
        await eventually(lambda: links.link(DST).counters.acked_bytes_total >= parts[0].nbytes)
        assert receiver.used_bytes > 0
        await sender.abort(manifest.transfer_id, dest, "router chose local prefill")
        assert receiver.used_bytes == 0 and receiver.active_transfers == 0
        with pytest.raises(TransferFailed, match="local prefill"):
            await waiter
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(TransferFailed, match="aborted"):
            await _sender(links).send(manifest, parts, dest)
        assert receiver.totals.transfers_aborted == 1


async def test_receiver_at_its_memory_limit_refuses_cleanly():
    """A receiver whose memory is taken refuses a new transfer with NoCapacity, and accepts it once freed."""
    parts = hybrid_parts(seed=7)
    need = sum(p.nbytes for p in parts)
    config = ReceiverConfig(max_total_bytes=need + need // 2, max_transfer_bytes=need + 4096, transfer_timeout_s=30)
    async with tcp_receiver(config) as (receiver, server), KvLinks(SRC) as links:
        dest = tcp_dest(server)
        first = _manifest(_sender(links), "t-mem-1", parts)
        second = _manifest(_sender(links), "t-mem-2", parts)
        twice = parts + [StatePart(p.layer + 10, p.kind, p.name, p.array) for p in parts]
        big = _manifest(_sender(links), "t-mem-big", twice)
        with pytest.raises(NoCapacity, match="per-transfer limit"):
            await _sender(links).send(big, [], dest)
        waiter = asyncio.create_task(receiver.wait(first.transfer_id, timeout_s=10))
        gate = asyncio.Event()
        task = asyncio.create_task(_sender(links).send(first, _layers(parts, stop_after=2, gate=gate), dest))
        await eventually(lambda: receiver.active_transfers == 1)
        used = receiver.used_bytes
        with pytest.raises(NoCapacity, match="receiver holds"):
            await _sender(links).send(second, parts, dest)
        assert receiver.used_bytes == used and receiver.totals.transfers_refused == 2
        gate.set()
        await task
        (await waiter).release()
        waiter = asyncio.create_task(receiver.wait(second.transfer_id, timeout_s=10))
        await _sender(links).send(second, parts, dest)
        with await waiter as done:
            assert_restored(parts, done.parts, ["raw"] * len(parts))


async def test_receiver_deadline_frees_a_stalled_transfer():
    """A transfer not complete within the receiver's deadline is aborted and its memory freed."""
    parts = hybrid_parts(seed=9)
    config = ReceiverConfig(max_total_bytes=16 << 20, transfer_timeout_s=0.3, reap_interval_s=0.05)
    async with tcp_receiver(config) as (receiver, server), KvLinks(SRC) as links:
        sender = _sender(links)
        manifest = _manifest(sender, "t-stall", parts)
        waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=10))
        task = asyncio.create_task(sender.send(manifest, _layers(parts, stop_after=1), tcp_dest(server)))
        started = time.monotonic()
        with pytest.raises(TransferFailed, match="deadline"):
            await waiter
        # Lower bound: the deadline itself; upper: reaper period plus scheduling slack on a loaded machine.
        assert 0.3 <= time.monotonic() - started < 5.0
        assert receiver.used_bytes == 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_parts_are_sent_from_their_own_memory():
    """A raw part's wire bytes are a view of its array (no copy before the socket)."""
    array = np.arange(1000, dtype=np.float32)
    wire = encode(array, "raw")
    assert np.shares_memory(np.frombuffer(wire, dtype=np.uint8), array)


async def test_admission_refuses_a_transfer_before_it_takes_memory():
    """A receiver's admission check sees the manifest and the bytes it needs; its refusal reaches the sender typed."""
    parts = hybrid_parts(seed=9)
    asked: list[tuple[str, int]] = []

    def admit(manifest, bytes_needed: int) -> None:
        asked.append((manifest.transfer_id, bytes_needed))
        if manifest.transfer_id != "t-admitted":
            raise BadRequest(f"transfer {manifest.transfer_id} has no reservation")

    async with tcp_receiver(admit=admit) as (receiver, server), KvLinks(SRC) as links:
        with pytest.raises(BadRequest, match="t-stranger has no reservation"):
            await _sender(links).send(_manifest(_sender(links), "t-stranger", parts), parts, tcp_dest(server))
        assert receiver.used_bytes == 0 and receiver.totals.transfers_refused == 1
        admitted = _manifest(_sender(links), "t-admitted", parts)
        waiter = asyncio.create_task(receiver.wait(admitted.transfer_id, timeout_s=10))
        await _sender(links).send(admitted, parts, tcp_dest(server))
        with await waiter as done:
            assert_restored(parts, done.parts, [s.codec for s in admitted.parts])
    assert [tid for tid, _ in asked] == ["t-stranger", "t-admitted"]
    assert all(need >= sum(p.nbytes for p in parts) for _, need in asked)
