"""JetStream transfers between two sites joined by a gateway (the session's supercluster)."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import pytest

from libs.common import subjects
from libs.common.bus import connect
from libs.common.errors import NoCapacity, TransferFailed
from libs.common.messages import KvChunk, encode, link_stats_decoder
from libs.kvwire.js_recv import CHUNK_HEADER, JetStreamReceiver
from libs.kvwire.js_send import JetStreamConfig, JetStreamTransport, message_id
from libs.kvwire.link import LinkConfig
from libs.kvwire.linkstats import KvLinks
from libs.kvwire.receiver import KvReceiver, ReceiverConfig
from libs.kvwire.sender import Destination, KvSender, encode_part
from tests.kvwire.support import DST, SRC, assert_restored, eventually, hybrid_parts, specs_of

CHUNK = 256 << 10


@contextlib.asynccontextmanager
async def _sites(supercluster, instance: str, config: ReceiverConfig | None = None):
    """A decode-side receiver at DST and a sender's connection at SRC."""
    nc_dst = await connect(supercluster.url(DST), name=f"test-{instance}")
    nc_src = await connect(supercluster.url(SRC), name=f"test-{instance}-sender")
    receiver = KvReceiver(config or ReceiverConfig(max_total_bytes=64 << 20, transfer_timeout_s=30.0))
    try:
        async with receiver, JetStreamReceiver(nc_dst, receiver, DST, instance) as js_receiver:
            yield receiver, js_receiver, nc_src, nc_dst
    finally:
        await nc_src.close()
        await nc_dst.close()


async def _layers(parts, stop_after: int | None = None):
    for i, part in enumerate(parts):
        if i == stop_after:
            await asyncio.Event().wait()
        await asyncio.sleep(0)
        yield part


async def _stream_messages(js_receiver: JetStreamReceiver, tid: str) -> int:
    subject = subjects.kv_transfer(DST, js_receiver.instance, tid)
    info = await js_receiver.js.stream_info(js_receiver.stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def test_transfer_across_two_sites_through_a_stream_at_the_destination(supercluster):
    """Chunks cross the gateway into a stream placed at the decode site; parts arrive intact; messages removed."""
    parts = hybrid_parts(seed=20, tokens=1024)
    async with _sites(supercluster, "decode-js") as (receiver, js_receiver, nc_src, nc_dst):
        info = await js_receiver.js.stream_info(js_receiver.stream)
        assert info.cluster.name == DST  # the stream lives where the KV is consumed
        stats_sub = await nc_dst.subscribe(subjects.link(SRC, DST))  # a router at the decode site
        links = KvLinks(SRC, LinkConfig(publish_interval_s=0.1), nc=nc_src)
        async with links:
            sender = KvSender(JetStreamTransport(nc_src, JetStreamConfig(chunk_bytes=CHUNK)), links)
            manifest = sender.manifest(
                transfer_id="t-js",
                dst_site=DST,
                model="ref",
                block_size=64,
                num_tokens=1024,
                specs=specs_of(parts, "zstd"),
            )
            waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=20))
            report = await sender.send(manifest, _layers(parts), Destination(DST, "decode-js"))
            with await waiter as done:
                assert_restored(parts, done.parts, [s.codec for s in manifest.parts])
            assert report.attempts == 1 and report.chunks_resent == 0
            async with asyncio.timeout(10):
                while True:
                    stats = link_stats_decoder.decode((await stats_sub.next_msg(timeout=5)).data)
                    if stats.acked_bytes_total == report.wire_bytes:
                        break
            assert stats.src_site == SRC and stats.dst_site == DST and stats.rtt_s > 0

        async def purged() -> bool:
            return await _stream_messages(js_receiver, manifest.transfer_id) == 0

        await eventually(purged)


async def test_corrupt_chunk_in_the_stream_is_detected_and_resent(supercluster):
    """A stored chunk that fails its checksum is not held; the end round reports it and the sender resends it."""
    parts = hybrid_parts(seed=23, tokens=1024)
    async with _sites(supercluster, "decode-js-bad") as (receiver, _, nc_src, _dst), KvLinks(SRC) as links:
        sender = KvSender(JetStreamTransport(nc_src, JetStreamConfig(chunk_bytes=CHUNK)), links)
        manifest = sender.manifest(
            transfer_id="t-js-bad", dst_site=DST, model="ref", block_size=64, num_tokens=1024, specs=specs_of(parts)
        )
        # A corrupted copy of part 2's first chunk takes the sender's message id: the stream keeps it and
        # drops the sender's good copy as a duplicate.
        good = next(encode_part(2, parts[2], manifest).chunks(manifest.chunk_bytes))
        bad = bytearray(good.payload)
        bad[1234] ^= 0x01
        header = KvChunk(
            transfer_id=manifest.transfer_id,
            part=2,
            offset=0,
            length=len(bad),
            checksum=good.checksum,
            part_wire_bytes=good.part_wire_bytes,
        )
        await nc_src.jetstream().publish(
            subjects.kv_transfer(DST, "decode-js-bad", manifest.transfer_id),
            bytes(bad),
            headers={
                "Nats-Msg-Id": message_id(manifest.transfer_id, 2, 0, 0),
                CHUNK_HEADER: base64.b64encode(encode(header)).decode(),
            },
        )
        waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=20))
        report = await sender.send(manifest, parts, Destination(DST, "decode-js-bad"))
        with await waiter as done:
            assert_restored(parts, done.parts, ["raw"] * len(parts))
        assert report.chunks_resent == 1 and report.attempts == 1
        assert receiver.totals.bad_chunks == 1


async def test_abort_over_jetstream_frees_memory_and_purges(supercluster):
    """An abort reaches the decode site: memory freed, the transfer's messages and consumer removed."""
    parts = hybrid_parts(seed=21, tokens=1024)
    async with _sites(supercluster, "decode-js-abort") as (receiver, js_receiver, nc_src, _):
        async with KvLinks(SRC) as links:
            sender = KvSender(JetStreamTransport(nc_src, JetStreamConfig(chunk_bytes=CHUNK)), links)
            manifest = sender.manifest(
                transfer_id="t-js-abort",
                dst_site=DST,
                model="ref",
                block_size=64,
                num_tokens=1024,
                specs=specs_of(parts),
            )
            dest = Destination(DST, "decode-js-abort")
            task = asyncio.create_task(sender.send(manifest, _layers(parts, stop_after=3), dest))
            await eventually(lambda: links.link(DST).counters.acked_bytes_total >= parts[0].nbytes + parts[2].nbytes)
            assert receiver.used_bytes > 0
            await sender.abort(manifest.transfer_id, dest, "fallback to local prefill")
            assert receiver.used_bytes == 0
            assert await _stream_messages(js_receiver, manifest.transfer_id) == 0
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(TransferFailed, match="fallback"):
                await sender.send(manifest, parts, dest)


async def test_jetstream_receiver_at_its_memory_limit_refuses(supercluster):
    """Begin over JetStream is refused with NoCapacity when the decode side cannot hold the transfer."""
    parts = hybrid_parts(seed=22, tokens=1024)
    config = ReceiverConfig(max_total_bytes=1 << 20, transfer_timeout_s=30.0)
    async with _sites(supercluster, "decode-js-full", config) as (receiver, _, nc_src, _dst), KvLinks(SRC) as links:
        sender = KvSender(JetStreamTransport(nc_src, JetStreamConfig(chunk_bytes=CHUNK)), links)
        manifest = sender.manifest(
            transfer_id="t-js-full", dst_site=DST, model="ref", block_size=64, num_tokens=1024, specs=specs_of(parts)
        )
        with pytest.raises(NoCapacity):
            await sender.send(manifest, parts, Destination(DST, "decode-js-full"))
        assert receiver.used_bytes == 0 and receiver.totals.transfers_refused == 1
