"""What a sender counts as the link setting the pace (``LinkStats.limited_s``): KV waiting on it, not late acks."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from libs.common.bus import connect
from libs.common.state_parts import StatePart
from libs.kvwire.js_recv import JetStreamReceiver
from libs.kvwire.js_send import JetStreamConfig, JetStreamTransport
from libs.kvwire.link import LinkConfig
from libs.kvwire.linkstats import KvLinks, LinkCounters
from libs.kvwire.receiver import KvReceiver, ReceiverConfig
from libs.kvwire.sender import Destination, KvSender
from libs.lab.servers import free_port
from libs.lab.wan import Forward, LinkRelay
from tests.kvwire.support import DST, SRC, hybrid_parts, specs_of, tcp_dest, tcp_receiver, tcp_sender

CHUNK = 1 << 20
GBIT = 1e9 / 8  # bytes


class Clock:
    """A settable monotonic clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def counters() -> tuple[LinkCounters, Clock]:
    """Counters on a fake clock."""
    clock = Clock()
    return LinkCounters(0.125, clock), clock


def ack(c: LinkCounters, clock: Clock, at: float, sent_at: float, nbytes: int = CHUNK) -> None:
    """The ack of a chunk sent at ``sent_at`` arrives at ``at``."""
    clock.now = at
    c.acked(nbytes, at - sent_at)


def snapshot(c: LinkCounters, clock: Clock, at: float):
    """The LinkStats at ``at``."""
    clock.now = at
    return c.snapshot(SRC, DST, 10.0)


def test_a_burst_the_link_spreads_out_is_limited_at_the_links_rate():
    """Eight chunks sent at once, acked 0.1 s apart (80 Mbps): the link set the pace from the first ack to the last."""
    c, clock = counters()
    for _ in range(8):
        c.sent(CHUNK)
    for k in range(8):
        ack(c, clock, 0.02 + 0.1 * k, 0.0)
    s = snapshot(c, clock, 1.0)
    assert s.limited_s == pytest.approx(0.7)
    assert s.limited_goodput_gbps == pytest.approx(7 * CHUNK / 0.7 / GBIT)


def test_chunks_paced_by_their_prefill_with_late_acks_are_not_limited():
    """A chunk every 140 ms, each acked 200 ms later (CPU delay): sent as spread as acked, nothing waited on the link."""
    c, clock = counters()
    for k in range(20):
        c.sent(CHUNK)
        ack(c, clock, 0.14 * k + 0.2, 0.14 * k)
    s = snapshot(c, clock, 3.0)
    assert s.limited_s == 0.0 and s.limited_goodput_gbps == 0.0
    assert s.rtt_s == pytest.approx(0.2)


def test_a_chunk_sent_after_the_last_ack_and_acked_late_is_latency_not_rate():
    """Sent just after an ack, acked 200 ms later (a busy CPU): it did not wait behind anything on the link."""
    c, clock = counters()
    ack(c, clock, 1.0, 0.98)
    ack(c, clock, 1.2, 1.0001)
    assert snapshot(c, clock, 2.0).limited_s == 0.0


def test_acks_held_back_then_handled_together_are_not_a_slow_link():
    """A burst acked 300 ms late in one go (a stalled process): the acks are not spread, the rate is not low."""
    c, clock = counters()
    for k in range(8):
        ack(c, clock, 0.3 + 0.0005 * k, 0.001 * k / 8)
    s = snapshot(c, clock, 1.0)
    assert s.limited_s < 0.005
    assert s.limited_goodput_gbps == 0.0 or s.limited_goodput_gbps > 10.0


def test_acks_while_a_send_waits_for_its_window_are_limited():
    """A send waiting for window room: each ack meanwhile came at the link's pace (here 1 chunk per 10 ms)."""
    c, clock = counters()
    ack(c, clock, 0.0, -0.5)  # the window filled long ago
    with c.window_wait():
        for k in range(1, 51):
            ack(c, clock, 0.01 * k, 0.01 * k - 0.5)
    ack(c, clock, 0.6, 0.55)  # after the wait: each chunk sent after the previous ack, paced by the sender
    with c.window_wait(full=False):
        ack(c, clock, 0.9, 0.62)
    s = snapshot(c, clock, 1.0)
    assert s.limited_s == pytest.approx(0.5)
    assert s.limited_goodput_gbps == pytest.approx(CHUNK / 0.01 / GBIT)


def test_a_spread_run_across_two_intervals_counts_in_both():
    """The part of a run in each interval counts there; the second part starts from the last ack before the snapshot."""
    c, clock = counters()
    for k in range(10):
        ack(c, clock, 0.5 + 0.1 * k, 0.0)
        if k == 4:
            first = snapshot(c, clock, 1.0)
    second = snapshot(c, clock, 2.0)
    assert first.limited_s == pytest.approx(0.4) and second.limited_s == pytest.approx(0.5)
    assert first.limited_goodput_gbps == pytest.approx(second.limited_goodput_gbps)


def test_a_run_is_judged_whole_not_per_interval():
    """Sends paced by the prefill at first, then the rest at once: the link shows only later, and the run counts whole."""
    c, clock = counters()
    sends = [0.125 * k for k in range(4)] + [0.375] * 6
    for k, sent_at in enumerate(sends):
        ack(c, clock, 0.125 * (k + 1), sent_at)
        if k == 3:
            first = snapshot(c, clock, 0.55)
    second = snapshot(c, clock, 2.0)
    assert first.limited_s == 0.0  # so far the acks came as spread as the sends
    assert second.limited_s == pytest.approx(1.125)  # from the first ack to the last
    assert second.limited_goodput_gbps == pytest.approx(9 * CHUNK / 1.125 / GBIT)


def _parts(layers: int, tokens: int = 2048) -> list[StatePart]:
    """``layers`` float16 K/V pairs of ``tokens`` tokens (256 KiB each)."""
    rng = np.random.default_rng(0)
    return [
        StatePart(layer, "attn_kv", name, rng.standard_normal((tokens, 1, 64)).astype(np.float16))
        for layer in range(layers)
        for name in ("k", "v")
    ]


async def _send_through(relay_gbps: float, parts: list[StatePart], gap_s: float = 0.0, window_bytes: int = 64 << 20):
    """A real paced (10 Gbps) TCP transfer through the lab's WAN relay at ``relay_gbps`` / 10 ms; its LinkStats."""
    async with tcp_receiver() as (receiver, server):
        port = free_port()
        relay = LinkRelay(
            ("dc-a", "dc-b"),
            forwards=[Forward("dc-a", ("127.0.0.1", port), server.address)],
            gbps=relay_gbps,
            rtt_ms=10.0,
        ).start()
        try:
            async with KvLinks(SRC, LinkConfig(default_budget_gbps=10.0)) as links:
                sender = tcp_sender(links, connections=2, window_bytes=window_bytes)
                manifest = sender.manifest(
                    transfer_id=f"t-{int(relay_gbps * 1000)}-{int(gap_s * 1000)}-{window_bytes}",
                    dst_site=DST,
                    model="ref",
                    block_size=64,
                    num_tokens=2048,
                    specs=specs_of(parts),
                )

                async def produced():
                    for part in parts:
                        await asyncio.sleep(gap_s)  # the prefill computing the next layer
                        yield part

                dest = tcp_dest(server)
                waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=30))
                await sender.send(manifest, produced(), type(dest)(dest.site, dest.instance, "127.0.0.1", port))
                (await waiter).release()
                return links.link(DST).stats()
        finally:
            relay.stop()


async def test_a_real_transfer_through_a_slow_relay_is_limited_at_the_relays_rate():
    """4 MiB at once through a 40 Mbps relay: ~0.8 s of limited time at about 40 Mbps."""
    stats = await _send_through(0.04, _parts(8))
    # Lower bound: the relay never delivers faster than set; upper: its 5 ms of banked credit and the
    # first ack (not counted) allow a few % more, and a loaded machine only slows it.
    assert 0.030 <= stats.limited_goodput_gbps <= 0.045
    assert stats.limited_s >= 0.5  # 4 MiB less the first chunks at 40 Mbps: ~0.8 s


async def test_a_real_transfer_held_by_its_window_is_limited_throughout():
    """4 MiB through a 40 Mbps relay with a 256 KiB window: sends wait for acks the whole time, all of it limited."""
    stats = await _send_through(0.04, _parts(8), window_bytes=256 << 10)
    assert 0.030 <= stats.limited_goodput_gbps <= 0.045  # bounds as above
    assert stats.limited_s >= 0.5


async def test_a_real_transfer_paced_by_its_prefill_is_not_limited():
    """The same parts, one every 60 ms (the prefill), on an ample 2 Gbps relay: no limited time worth a rate."""
    stats = await _send_through(2.0, _parts(8), gap_s=0.06)
    assert stats.limited_s < 0.05 or stats.limited_goodput_gbps > 1.0


async def test_jetstream_publishes_waiting_for_their_window_are_limited(supercluster):
    """A one-publish window: every chunk waits for the previous one's stream ack, so what is acked meanwhile counts."""
    parts = hybrid_parts(seed=7, tokens=4096, attn_layers=2)
    nc_dst = await connect(supercluster.url(DST), name="test-limited-js")
    nc_src = await connect(supercluster.url(SRC), name="test-limited-js-sender")
    receiver = KvReceiver(ReceiverConfig(max_total_bytes=64 << 20, transfer_timeout_s=30.0))
    try:
        async with receiver, JetStreamReceiver(nc_dst, receiver, DST, "decode-lim"), KvLinks(SRC) as links:
            transport = JetStreamTransport(nc_src, JetStreamConfig(chunk_bytes=256 << 10, window=1))
            sender = KvSender(transport, links)
            manifest = sender.manifest(
                transfer_id="t-js-window",
                dst_site=DST,
                model="ref",
                block_size=64,
                num_tokens=4096,
                specs=specs_of(parts),
            )
            waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=30))
            await sender.send(manifest, parts, Destination(DST, "decode-lim"))
            (await waiter).release()
            stats = links.link(DST).stats()
    finally:
        await nc_src.close()
        await nc_dst.close()
    limited_bytes = stats.limited_goodput_gbps * 1e9 / 8 * stats.limited_s
    assert stats.limited_s > 0 and limited_bytes >= stats.acked_bytes_total / 2  # all but the first chunks
