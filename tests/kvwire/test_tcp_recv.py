"""The TCP receiver's side of the protocol, frame by frame: an early end marker, late chunks, keepalives."""

from __future__ import annotations

import asyncio
import socket

from libs.common.messages import (
    KvBegin,
    KvChunkAck,
    KvEnd,
    KvJoin,
    KvManifest,
    KvResumeState,
    encode,
    kv_receiver_frame_decoder,
)
from libs.common.state_parts import StatePart
from libs.kvwire.format import FRAME_PREFIX, build_manifest, frame
from libs.kvwire.sender import OutChunk, encode_part
from libs.kvwire.sockets import KEEPALIVE, read_frame
from tests.kvwire.support import CHUNK, DST, SRC, hybrid_parts, specs_of, tcp_receiver


def _transfer(tid: str, seed: int) -> tuple[KvManifest, list[OutChunk], list[int]]:
    """A manifest, every chunk of its parts and the parts' digests."""
    parts: list[StatePart] = hybrid_parts(seed=seed)
    manifest = build_manifest(
        transfer_id=tid,
        src_site=SRC,
        dst_site=DST,
        model="ref",
        block_size=64,
        num_tokens=512,
        specs=specs_of(parts),
        chunk_bytes=CHUNK,
    )
    encoded = [encode_part(i, part, manifest) for i, part in enumerate(parts)]
    return manifest, [c for e in encoded for c in e.chunks(CHUNK)], [e.digest for e in encoded]


class _Peer:
    """One blocking sender-side connection speaking raw frames (in a worker thread)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=5.0)
        self.prefix = bytearray(FRAME_PREFIX.size)

    def send(self, *msgs) -> None:
        for msg in msgs:
            self.sock.sendall(frame(encode(msg)))

    def chunk(self, tid: str, chunk: OutChunk) -> None:
        self.sock.sendall(frame(encode(chunk.header(tid, 0))) + bytes(chunk.payload))

    def read(self):
        while True:
            msg = read_frame(self.sock, self.prefix, kv_receiver_frame_decoder)
            if msg is not None:
                return msg

    def close(self) -> None:
        self.sock.close()


async def test_an_end_marker_ahead_of_the_chunks_is_answered_by_the_connection_that_completes_the_transfer():
    """The end marker goes on one connection before any chunk; the answer comes once the other one has brought them."""
    manifest, chunks, digests = _transfer("t-early-end", seed=40)
    async with tcp_receiver() as (receiver, server):
        first, second = _Peer(server.address), _Peer(server.address)
        try:
            first.send(KvBegin(manifest=manifest))
            assert (await asyncio.to_thread(first.read)) == KvResumeState(transfer_id="t-early-end", complete=False)
            second.send(KvJoin(transfer_id="t-early-end", conn=1))
            assert isinstance(await asyncio.to_thread(second.read), KvResumeState)
            first.send(KvEnd(transfer_id="t-early-end", digests=digests, round=0))
            for chunk in chunks:
                second.chunk("t-early-end", chunk)
            acks = [await asyncio.to_thread(second.read) for _ in chunks]
            assert all(isinstance(a, KvChunkAck) and a.ok for a in acks)
            done = await asyncio.to_thread(second.read)
            assert isinstance(done, KvResumeState) and done.complete and done.end_round == 0
            (await receiver.wait("t-early-end", timeout_s=5)).release()
        finally:
            first.close()
            second.close()


async def test_one_connection_serves_transfers_in_sequence_ignoring_keepalives_and_late_chunks():
    """Keepalives anywhere between frames, a chunk resent after its transfer was verified and released, then another
    transfer: the connection stays up throughout and the late chunk is acknowledged as held."""
    first, first_chunks, first_digests = _transfer("t-seq-a", seed=41)
    second, second_chunks, second_digests = _transfer("t-seq-b", seed=42)
    async with tcp_receiver() as (receiver, server):
        peer = _Peer(server.address)
        try:
            for manifest, chunks, digests in (
                (first, first_chunks, first_digests),
                (second, second_chunks, second_digests),
            ):
                tid = manifest.transfer_id
                peer.sock.sendall(KEEPALIVE)
                peer.send(KvBegin(manifest=manifest))
                assert not (await asyncio.to_thread(peer.read)).complete
                for chunk in chunks:
                    peer.chunk(tid, chunk)
                    peer.sock.sendall(KEEPALIVE)
                peer.send(KvEnd(transfer_id=tid, digests=digests, round=0))
                replies = [await asyncio.to_thread(peer.read) for _ in range(len(chunks) + 1)]
                assert all(isinstance(r, KvChunkAck) and r.ok for r in replies[:-1])
                assert replies[-1].complete
                (await receiver.wait(tid, timeout_s=5)).release()
                peer.chunk(tid, chunks[0])  # a resend that was on its way when the transfer completed
                late = await asyncio.to_thread(peer.read)
                assert isinstance(late, KvChunkAck) and late.ok
            assert server.accepted_total == 1 and server.open_connections == 1
        finally:
            peer.close()
