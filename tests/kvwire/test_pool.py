"""Direct TCP keeps its connections: reused across transfers, rebuilt when broken, closed when idle, kept alive."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

from nats.aio.client import Client as NatsClient

from libs.common.messages import KvBegin, KvChunk, KvChunkAck, KvEnd, KvResumeState, encode, kv_sender_frame_decoder
from libs.common.state_parts import StatePart
from libs.kvwire.format import FRAME_PREFIX, frame
from libs.kvwire.linkstats import KvLinks
from libs.kvwire.sender import KvSender, SenderConfig
from libs.kvwire.sockets import Closed, read_frame, recv_exact
from libs.kvwire.tcp_send import TcpConfig, TcpTransport
from services.prefill_gateway.config import PrefillGatewayConfig
from services.prefill_gateway.senders import Senders
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


def _manifest(sender: KvSender, tid: str, parts: list[StatePart]):
    return sender.manifest(
        transfer_id=tid, dst_site=DST, model="ref", block_size=64, num_tokens=512, specs=specs_of(parts)
    )


async def _deliver(sender: KvSender, receiver, tid: str, parts: list[StatePart], dest) -> None:
    """Send ``parts`` as ``tid`` and check the receiver restored them (its memory is released after)."""
    waiter = asyncio.create_task(receiver.wait(tid, timeout_s=10))
    report = await sender.send(_manifest(sender, tid, parts), parts, dest)
    assert report.attempts == 1
    with await waiter as done:
        assert_restored(parts, done.parts, ["raw"] * len(parts))


async def test_two_transfers_to_one_destination_reuse_the_same_connections():
    """Four stripes are accepted once; the second transfer claims them again and they stay open afterwards."""
    parts = hybrid_parts(seed=30)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        transport = TcpTransport(TcpConfig(connections=4, chunk_bytes=CHUNK))
        try:
            sender = KvSender(transport, links)
            await _deliver(sender, receiver, "t-reuse-1", parts, tcp_dest(server))
            await _deliver(sender, receiver, "t-reuse-2", parts, tcp_dest(server))
            assert server.accepted_total == 4
            assert server.open_connections == 4 and transport.pool.open_connections == 4
        finally:
            await transport.close()
        await eventually(lambda: server.open_connections == 0)  # closing the pool closes them


async def test_pooled_connections_lost_between_transfers_are_rebuilt_without_failing_the_transfer():
    """A middlebox forgets the eight pooled connections of two transfers; with a single attempt allowed, the next
    transfer still succeeds: its begin meets a reset on a kept connection, the pool drops every idle connection to
    that destination, and the transfer starts again on fresh ones without counting an attempt.

    Keepalives are off so the sender cannot learn of the loss before it claims the connections again.
    """
    parts = hybrid_parts(seed=31)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        proxy = Proxy(server.address)
        transport = TcpTransport(TcpConfig(connections=4, chunk_bytes=CHUNK, keepalive_s=0.0))
        try:
            sender = KvSender(transport, links, SenderConfig(max_attempts=1))
            await asyncio.gather(
                *[_deliver(sender, receiver, tid, parts, tcp_dest(proxy)) for tid in ("t-lost-a", "t-lost-b")]
            )
            proxy.forget_all()
            await eventually(lambda: server.open_connections == 0)  # the receiver saw them go; the sender did not
            assert transport.pool.open_connections == 8
            await _deliver(sender, receiver, "t-lost-1", parts, tcp_dest(proxy))
            await _deliver(sender, receiver, "t-lost-2", parts, tcp_dest(proxy))
            assert server.accepted_total == 12  # eight, then four fresh ones that the next transfer reused
        finally:
            await transport.close()
            proxy.close()


async def test_connections_idle_past_the_pool_timeout_are_closed():
    """With a 0.3 s idle timeout the stripes stay open after a transfer and close once it has passed."""
    parts = hybrid_parts(seed=32)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        transport = TcpTransport(TcpConfig(connections=2, chunk_bytes=CHUNK, pool_idle_s=0.3))
        try:
            await _deliver(KvSender(transport, links), receiver, "t-idle", parts, tcp_dest(server))
            returned = time.monotonic()
            assert server.open_connections == 2
            await eventually(lambda: server.open_connections == transport.pool.open_connections == 0, timeout_s=5.0)
            idle_s = time.monotonic() - returned
        finally:
            await transport.close()
    # Lower bound: the timeout, counted from the release just before the send returned. Upper: the writer
    # notices on its next keepalive tick (0.1 s); the rest is slack for a loaded 2-core machine.
    assert 0.29 <= idle_s <= 1.5


async def test_one_connection_carries_transfers_in_sequence_with_keepalives_between_them():
    """One stripe, a keepalive every 20 ms: the receiver keeps the connection through 0.3 s of keepalives."""
    parts = hybrid_parts(seed=33)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        transport = TcpTransport(TcpConfig(connections=1, chunk_bytes=CHUNK, keepalive_s=0.02))
        try:
            sender = KvSender(transport, links)
            await _deliver(sender, receiver, "t-seq-1", parts, tcp_dest(server))
            before = server.wire_bytes_received()
            await asyncio.sleep(0.3)  # the idle gap under test: keepalives flow during it
            keepalive_bytes = server.wire_bytes_received() - before
            await _deliver(sender, receiver, "t-seq-2", parts, tcp_dest(server))
            await _deliver(sender, receiver, "t-seq-3", parts, tcp_dest(server))
            assert server.accepted_total == 1
        finally:
            await transport.close()
    # 15 keepalives of 4 bytes in 0.3 s; at least a third of them even if the writer thread is starved.
    assert 20 <= keepalive_bytes <= 4 * 20


class _AckAfterEnd:
    """A scripted receiver: one connection, every transfer answered complete at its end marker while the ack of
    its first chunk is still on its way (sent 50 ms later): a race the real receiver's threads can run into."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._conversation, args=(sock,), daemon=True).start()

    def _conversation(self, sock: socket.socket) -> None:
        prefix, held = bytearray(FRAME_PREFIX.size), []
        with sock:
            while True:
                try:
                    msg = read_frame(sock, prefix, kv_sender_frame_decoder)
                except (OSError, Closed):
                    return
                if isinstance(msg, KvBegin):
                    sock.sendall(frame(encode(KvResumeState(transfer_id=msg.manifest.transfer_id, complete=False))))
                elif isinstance(msg, KvChunk):
                    recv_exact(sock, memoryview(bytearray(msg.length)))
                    ack = KvChunkAck(transfer_id=msg.transfer_id, part=msg.part, offset=msg.offset, ok=True)
                    if held:
                        sock.sendall(frame(encode(ack)))
                    held.append(ack)
                elif isinstance(msg, KvEnd):
                    sock.sendall(frame(encode(KvResumeState(transfer_id=msg.transfer_id, complete=True, end_round=0))))
                    time.sleep(0.05)
                    sock.sendall(frame(encode(held[0])))
                    held.clear()


async def test_acks_arriving_after_the_receivers_answer_are_awaited_and_the_connection_goes_back_clean():
    """The first chunk's ack comes after "complete": the sender waits for it, counts every byte acknowledged and
    none lost, and the next transfer reuses the connection."""
    parts = hybrid_parts(seed=34)
    peer = _AckAfterEnd()
    async with KvLinks(SRC) as links:
        transport = TcpTransport(TcpConfig(connections=1, chunk_bytes=CHUNK))
        try:
            sender = KvSender(transport, links)
            for tid in ("t-late-ack-1", "t-late-ack-2"):
                await sender.send(_manifest(sender, tid, parts), parts, tcp_dest(peer))
            counters = links.link(DST).counters
            assert counters.acked_bytes_total == 2 * sum(p.nbytes for p in parts) and counters.bytes_in_flight == 0
            assert peer.accepted == 1
        finally:
            await transport.close()
            peer.listener.close()


async def test_the_prefill_gateways_settings_reach_one_pool_shared_by_its_tcp_senders():
    """PREFILL_GATEWAY_TCP_POOL / _TCP_POOL_IDLE_S / _TCP_KEEPALIVE_S configure the pool that the striped and the
    one-connection sender share; closing the senders closes it."""
    env = {
        "PREFILL_GATEWAY_TCP_POOL": "false",
        "PREFILL_GATEWAY_TCP_POOL_IDLE_S": "7.5",
        "PREFILL_GATEWAY_TCP_KEEPALIVE_S": "0",
    }
    config = PrefillGatewayConfig.from_env(env)
    async with KvLinks(SRC) as links:
        senders = Senders(NatsClient(), links, config)  # never connected: only the TCP senders are used
        striped, small = senders.pick("tcp", config.tcp_small_bytes), senders.pick("tcp", 0)
        assert striped.transport.config.connections == 4 and small.transport.config.connections == 1
        assert striped.transport.pool is small.transport.pool
        pool_config = striped.transport.pool.config
        assert (pool_config.pool, pool_config.pool_idle_s, pool_config.keepalive_s) == (False, 7.5, 0.0)
        await senders.close()
    assert PrefillGatewayConfig().tcp_pool and PrefillGatewayConfig().tcp_keepalive_s == 0.1
