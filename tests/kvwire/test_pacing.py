"""Pacing: the token bucket, and one budget shared by every transfer of a site pair."""

from __future__ import annotations

import asyncio
import time

from libs.kvwire.linkstats import KvLinks, LinkConfig, LinkCounters
from libs.kvwire.pacing import TokenBucket
from tests.kvwire.support import DST, SRC, hybrid_parts, specs_of, tcp_dest, tcp_receiver, tcp_sender


def test_bucket_lets_a_burst_through_then_charges_the_rate():
    """The first burst costs nothing; what follows waits its bytes' worth of budget."""
    bucket = TokenBucket(rate_gbps=0.08, burst_bytes=100_000)  # 10 MB/s
    assert bucket.reserve(100_000) == 0.0
    delay = bucket.reserve(500_000)
    assert 0.049 <= delay <= 0.0501  # 500 kB at 10 MB/s, less the microseconds elapsed
    assert TokenBucket(0, 1).reserve(10**12) == 0.0  # unpaced


def test_link_counters_report_goodput_and_rtt_per_interval():
    """A snapshot carries the interval's goodput, the smoothed RTT and what is still in flight."""
    counters = LinkCounters(rtt_gain=0.5)
    counters.transfer_started()
    counters.sent(3_000_000)
    time.sleep(0.05)
    counters.acked(2_000_000, rtt_s=0.010)
    counters.acked(500_000, rtt_s=0.020)
    stats = counters.snapshot(SRC, DST, budget_gbps=1.0)
    assert stats.bytes_in_flight == 500_000 and stats.active_transfers == 1
    assert stats.rtt_s == 0.015 and stats.min_rtt_s == 0.010
    # 20 Mbit acknowledged over the interval since construction (>= 50 ms, < 5 s on a loaded machine).
    assert 0.004 < stats.goodput_gbps <= 0.4 and stats.utilization == stats.goodput_gbps
    assert counters.snapshot(SRC, DST, 1.0).goodput_gbps == 0.0  # interval figures reset


async def test_concurrent_transfers_share_one_pair_budget():
    """Two transfers to the same site together stay within the pair's budget, and use most of it."""
    budget_gbps = 0.2  # 25 MB/s
    parts_a, parts_b = hybrid_parts(seed=10, tokens=4096), hybrid_parts(seed=11, tokens=4096)
    total = sum(p.nbytes for p in parts_a + parts_b)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC, LinkConfig(default_budget_gbps=budget_gbps)) as links:
        sender = tcp_sender(links)
        manifests = [
            sender.manifest(transfer_id=f"t-pace-{i}", dst_site=DST, model="ref", block_size=64, num_tokens=4096,
                            specs=specs_of(parts))
            for i, parts in enumerate((parts_a, parts_b))
        ]
        started = time.monotonic()
        await asyncio.gather(*(sender.send(m, p, tcp_dest(server)) for m, p in zip(manifests, (parts_a, parts_b), strict=True)))
        elapsed = time.monotonic() - started
        for m in manifests:
            (await receiver.wait(m.transfer_id, timeout_s=5)).release()
    ideal_s = total * 8 / (budget_gbps * 1e9)
    burst_s = links.config.burst_s
    # Lower bound: nothing beats the budget (less one burst). Upper bound: a loaded 2-core machine
    # delays threads and handshakes but cannot make the bucket slower than budget; 1.5x + 0.5 s is slack.
    assert ideal_s - burst_s - 0.01 <= elapsed <= ideal_s * 1.5 + 0.5
    assert links.link(DST).counters.acked_bytes_total >= total
