"""What a send reports about itself: pacing wait, stripes, kernel retransmissions, resumes, and a goodput within budget."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from libs.common.state_parts import StatePart
from libs.kvwire.link import LinkConfig
from libs.kvwire.linkstats import KvLinks, LinkCounters
from libs.kvwire.pacing import TokenBucket
from libs.kvwire.sender import KvSender, SendReport
from libs.kvwire.sockets import tcp_retransmits
from tests.kvwire.support import DST, SRC, eventually, hybrid_parts, specs_of, tcp_dest, tcp_receiver, tcp_sender

BUDGET_GBPS = 0.2  # 25 MB/s
REPO = Path(__file__).resolve().parents[2]


def _manifest(sender: KvSender, tid: str, parts: list[StatePart], attn_codec: str = "raw"):
    return sender.manifest(
        transfer_id=tid,
        dst_site=DST,
        model="ref",
        block_size=64,
        num_tokens=parts[-1].array.shape[0],
        specs=specs_of(parts, attn_codec),
    )


def _within_budget(report: SendReport, bucket: TokenBucket) -> bool:
    """A send's goodput is at most the budget plus the bucket's burst (its only allowance) over the send's duration."""
    return report.goodput_gbps <= BUDGET_GBPS + bucket.burst_bytes * 8 / 1e9 / report.duration_s


def test_the_bucket_times_each_transfers_wait_once_whatever_its_connections():
    """Two threads of one order waiting together count once; another order apart; ``forget`` drops a record."""
    bucket = TokenBucket(rate_gbps=0.008, burst_s=0.1, min_burst_bytes=1_000)  # 1 MB/s, 100 kB deep
    assert bucket.take(100_000) == 0.0  # empty
    stop = threading.Event()
    started = time.monotonic()
    threads = [threading.Thread(target=bucket.wait_blocking, args=(50_000, stop, 1)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    # Order 1 waited while either thread did: about the 100 ms both chunks need, never the ~150 ms the
    # two threads' waits add up to (the first waits ~50 ms, the second ~100 ms).
    assert 0.09 <= bucket.waited_s(1) <= elapsed
    assert bucket.waited_s(2) == 0.0
    bucket.forget(1)
    assert bucket.waited_s(1) == 0.0


async def test_a_paced_transfer_reports_its_wait_on_the_budget_and_its_stripes():
    """On a paced pair the sender waits for the budget nearly all along; unpaced it never waits; stripes are connections."""
    parts = hybrid_parts(seed=20, tokens=6144)  # ~6.3 MB: ~0.25 s at 25 MB/s
    wire = sum(p.nbytes for p in parts)
    async with tcp_receiver() as (receiver, server):
        async with KvLinks(SRC, LinkConfig(default_budget_gbps=BUDGET_GBPS)) as links:
            sender = tcp_sender(links, connections=4)
            manifest = _manifest(sender, "t-wait", parts)
            report = await sender.send(manifest, parts, tcp_dest(server))
            (await receiver.wait(manifest.transfer_id, timeout_s=5)).release()
            bucket = links.link(DST).bucket
        paced_s = (wire - bucket.burst_bytes) / (BUDGET_GBPS * 1e9 / 8)
        # Lower bound: every byte past the first burst waited for its budget, and some sender thread of the
        # transfer waits while any chunk is queued (the window holds them all); 0.8 leaves room for the
        # microseconds each thread spends sending. Upper bound: the wait is part of the transfer.
        assert 0.8 * paced_s <= report.pacing_wait_s <= report.duration_s
        assert report.stripes == 4 and report.resumes == 0
        assert isinstance(report.retransmits, int)  # Linux tells (TCP_INFO); loopback's probes may resend a few
        async with KvLinks(SRC) as links:
            sender = tcp_sender(links, connections=1)
            manifest = _manifest(sender, "t-unpaced", parts)
            report = await sender.send(manifest, parts, tcp_dest(server))
            (await receiver.wait(manifest.transfer_id, timeout_s=5)).release()
        assert report.pacing_wait_s == 0.0 and report.stripes == 1


async def test_goodput_is_the_wire_bytes_delivered_over_the_whole_transfer():
    """int8 KV (half the bytes of its float16), then a resend of a finished transfer: goodput never exceeds the budget."""
    parts = hybrid_parts(seed=21, tokens=8192)  # ~8.4 MB of float16 K/V, ~4.5 MB on the wire in int8
    async with (
        tcp_receiver() as (receiver, server),
        KvLinks(SRC, LinkConfig(default_budget_gbps=BUDGET_GBPS)) as links,
    ):
        sender = tcp_sender(links)
        bucket = links.link(DST).bucket
        manifest = _manifest(sender, "t-int8", parts, attn_codec="int8")
        waiter = asyncio.create_task(receiver.wait(manifest.transfer_id, timeout_s=10))
        report = await sender.send(manifest, parts, tcp_dest(server))
        assert report.payload_bytes > 1.8 * report.wire_bytes  # the decoded KV is far more than what crossed
        assert report.delivered_bytes == report.wire_bytes and _within_budget(report, bucket)
        assert report.goodput_gbps == pytest.approx(report.wire_bytes * 8 / 1e9 / report.duration_s)
        again = await tcp_sender(links).send(manifest, parts, tcp_dest(server))  # the receiver holds it all
        assert again.sent_bytes == 0 and again.delivered_bytes == 0 and again.goodput_gbps == 0.0
        assert again.skipped_bytes == again.wire_bytes
        (await waiter).release()


async def test_link_stats_goodput_stays_within_the_budget():
    """Busy goodput within the budget even just after an idle link's burst; goodput within it plus one burst."""
    parts = hybrid_parts(seed=22, tokens=16384)  # ~16.8 MB: ~0.67 s at 25 MB/s
    async with (
        tcp_receiver() as (receiver, server),
        KvLinks(SRC, LinkConfig(default_budget_gbps=BUDGET_GBPS)) as links,
    ):
        sender = tcp_sender(links)
        link = links.link(DST)
        manifest = _manifest(sender, "t-stats", parts)
        link.stats()  # the first interval starts now, the bucket full after an idle link
        task = asyncio.create_task(sender.send(manifest, parts, tcp_dest(server)))
        # The first sample once 1 MB is acknowledged: the 0.5 MB burst is half of it (~20 ms of budget after it).
        await eventually(lambda: link.counters.acked_bytes_total >= 1_000_000, poll_s=0.002)
        samples = [link.stats()]
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            samples.append(link.stats())
        report = await task
        (await receiver.wait(manifest.transfer_id, timeout_s=5)).release()
    assert len(samples) >= 3
    burst_gbit = link.bucket.burst_bytes * 8 / 1e9
    for i, s in enumerate(samples):
        busy_s = s.goodput_gbps * s.interval_s / s.busy_goodput_gbps if s.busy_goodput_gbps else 1.0
        # Any figure may carry one burst over the budget across the time it is over (tokens a sender that
        # fell behind finds again), but not the burst a transfer found on an idle link: its busy time counts
        # that burst as the time it was saved in, so the first interval has none (2 ms of budget are left
        # for acks handled late at its start).
        assert s.goodput_gbps <= BUDGET_GBPS + burst_gbit / s.interval_s, s
        assert s.busy_goodput_gbps <= BUDGET_GBPS * (1 + 0.002 / busy_s) + (burst_gbit / busy_s if i else 0.0), s
        assert s.limited_goodput_gbps <= BUDGET_GBPS, s
    assert _within_budget(report, link.bucket)


def test_acks_handled_late_count_over_the_time_their_chunks_were_sent():
    """Acks held 0.3 s by a stalled loop, then handled at once: the next interval's goodput is not inflated by them."""
    now = [0.0]
    counters = LinkCounters(0.125, clock=lambda: now[0])
    chunk, step = 25_000, 0.01  # 2.5 MB/s sent evenly, each chunk acked 1 ms after it left
    held = []  # chunks sent from 0.9 s on, acked only at 1.3 s (the loop stalled)
    counters.transfer_started()
    samples = []
    for k in range(150):
        sent_at = k * step
        if 0.9 <= sent_at < 1.0:
            held.append(sent_at)
        else:
            now[0] = sent_at + 0.001
            if held and now[0] >= 1.3:
                for late in held:
                    counters.acked(chunk, now[0] - late)
                held.clear()
            counters.acked(chunk, 0.001)
        if k in (99, 149):  # snapshots at 1.0 and 1.5 s
            now[0] = (k + 1) * step
            samples.append(counters.snapshot(SRC, DST, 0.0))
    first, second = samples
    rate_gbps = chunk / step * 8 / 1e9
    assert first.goodput_gbps == pytest.approx(90 * chunk * 8 / 1e9)  # what was acked in the second
    # Acked in the second interval: its 50 chunks and the 10 held from the first (60 in 0.5 s: 1.2x the rate);
    # they were sent over 0.59 s, which the figures are over (at most one chunk's worth above the rate).
    for gbps in (second.goodput_gbps, second.busy_goodput_gbps):
        assert rate_gbps * 0.98 <= gbps <= rate_gbps * 1.02, second
    assert second.goodput_gbps * second.interval_s == pytest.approx(60 * chunk * 8 / 1e9)


@pytest.mark.parametrize(("budget_gbps", "limited"), [(0.2, False), (1.0, True)])
def test_a_limited_rate_above_the_budget_is_not_a_limiting_link(budget_gbps, limited):
    """Acks at 0.52 Gbps while a send waits for window room: a limit on a 1 Gbps pair, none on a 0.2 Gbps one."""
    now = [0.0]
    counters = LinkCounters(0.125, clock=lambda: now[0])
    counters.acked(65_536, 0.0005)
    with counters.window_wait():
        for k in range(1, 11):
            now[0] = k * 0.001
            counters.acked(65_536, 0.0005)
    now[0] = 1.0
    s = counters.snapshot(SRC, DST, budget_gbps)
    assert (s.limited_s, s.limited_goodput_gbps) == (
        (pytest.approx(0.01), pytest.approx(0.524288)) if limited else (0.0, 0.0)
    )


def test_the_kernel_tells_a_tcp_sockets_retransmissions_and_nothing_for_others():
    """TCP_INFO on a fresh loopback connection: 0 retransmitted segments; a non-TCP socket: None."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                client.sendall(b"x" * 100_000)
                accepted.recv(1 << 20)
                assert tcp_retransmits(client) == 0
    left, right = socket.socketpair()
    with left, right:
        assert tcp_retransmits(left) is None


def lossy_transfer() -> dict:
    """In a network namespace of its own: a loopback that drops every 20th TCP packet carrying data, and a transfer."""
    subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1500"], check=True)  # segments as on Ethernet
    drop = "-p tcp -m length --length 1000:65535 -m statistic --mode nth --every 20 --packet 0 -j DROP"
    subprocess.run(["iptables", "-A", "INPUT", *drop.split()], check=True)
    return asyncio.run(_lossy_transfer())


async def _lossy_transfer() -> dict:
    """A striped transfer, its report's figures and the namespace's count of retransmitted segments."""
    parts = hybrid_parts(seed=23, tokens=4096)
    async with tcp_receiver() as (receiver, server), KvLinks(SRC) as links:
        sender = tcp_sender(links)
        manifest = _manifest(sender, "t-lossy", parts)
        before = _retransmitted_segments()
        report = await sender.send(manifest, parts, tcp_dest(server))
        namespace = _retransmitted_segments() - before
        (await receiver.wait(manifest.transfer_id, timeout_s=30)).release()
    return {"retransmits": report.retransmits, "stripes": report.stripes, "namespace": namespace}


def _retransmitted_segments() -> int:
    """The network namespace's count of TCP segments retransmitted (``RetransSegs`` in /proc/net/snmp)."""
    header, values = [
        line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Tcp:")
    ]
    return int(values[header.index("RetransSegs")])


@pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("iptables")),
    reason="needs root, unshare and iptables to drop segments in a network namespace of its own",
)
def test_a_lossy_path_shows_kernel_retransmissions_in_the_report():
    """Segments dropped on the path (a private network namespace) appear as the sender's kernel retransmissions."""
    code = "import json; from tests.kvwire.test_transfer_figures import lossy_transfer; print(json.dumps(lossy_transfer()))"
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["stripes"] == 4
    # ~4.3 MB is ~3,000 segments: with every 20th data packet dropped (a packet holds several segments on
    # loopback) about 100-200 go again; the namespace's count also holds the receiver's few (acks batched
    # into a packet of 1,000 bytes or more), so the sender's are at most all of them and nearly all.
    assert 5 <= figures["retransmits"] <= figures["namespace"] <= figures["retransmits"] * 1.1 + 2, figures
