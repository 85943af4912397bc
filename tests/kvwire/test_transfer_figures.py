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
from libs.kvwire.linkstats import KvLinks
from libs.kvwire.pacing import TokenBucket
from libs.kvwire.sender import KvSender, SendReport
from libs.kvwire.sockets import tcp_retransmits
from tests.kvwire.support import DST, SRC, hybrid_parts, specs_of, tcp_dest, tcp_receiver, tcp_sender

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
        # Lower bound: the transfer is paced by the budget, not by anything slower on loopback.
        assert report.goodput_gbps >= 0.5 * BUDGET_GBPS
        again = await tcp_sender(links).send(manifest, parts, tcp_dest(server))  # the receiver holds it all
        assert again.sent_bytes == 0 and again.delivered_bytes == 0 and again.goodput_gbps == 0.0
        assert again.skipped_bytes == again.wire_bytes
        (await waiter).release()


async def test_link_stats_goodput_stays_within_the_budget():
    """Every interval's goodput and busy goodput stay within the budget plus the bucket's burst over the interval."""
    interval_s = 0.25
    parts = hybrid_parts(seed=22, tokens=16384)  # ~16.8 MB: ~0.67 s at 25 MB/s
    async with (
        tcp_receiver() as (receiver, server),
        KvLinks(SRC, LinkConfig(default_budget_gbps=BUDGET_GBPS)) as links,
    ):
        sender = tcp_sender(links)
        link = links.link(DST)
        manifest = _manifest(sender, "t-stats", parts)
        link.stats()  # the first interval starts now
        task = asyncio.create_task(sender.send(manifest, parts, tcp_dest(server)))
        samples = []
        while not task.done():
            await asyncio.wait([task], timeout=interval_s)
            samples.append(link.stats())
        report = await task
        (await receiver.wait(manifest.transfer_id, timeout_s=5)).release()
    assert len(samples) >= 2
    for s in samples:
        # The bucket lets out at most its burst over the rate in any interval, whatever the interval.
        bound = BUDGET_GBPS + link.bucket.burst_bytes * 8 / 1e9 / s.interval_s
        assert s.goodput_gbps <= bound and s.busy_goodput_gbps <= bound, s
        assert s.utilization <= bound / BUDGET_GBPS
    assert _within_budget(report, link.bucket)


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
