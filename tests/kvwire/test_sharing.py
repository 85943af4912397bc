"""A site pair's budget shared by the processes of a site over NATS: shares, start, silence, departure."""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest

from libs.bench.kv import Child, max_window_gbps, mean_gbps
from libs.bench.kv_procs import SenderSpec, WireSampler, part_checksums, sender_process
from libs.common import subjects
from libs.common.bus import connect
from libs.common.messages import LinkShareAnnounce, LinkStats, link_stats_decoder
from libs.kvwire.format import DEFAULT_CHECKSUM
from libs.kvwire.link import Link, LinkConfig
from libs.kvwire.linkstats import KvLinks, LinkCounters
from libs.kvwire.pacing import TokenBucket
from libs.kvwire.receiver import ReceiverConfig
from libs.kvwire.sharing import PairShare, max_min_shares
from tests.kvwire.support import DST, SRC, eventually, tcp_receiver


def test_max_min_shares_meet_small_demands_first():
    """Small demands are met in full; what is left is split equally among the rest."""
    assert max_min_shares(1.0, {"a": 0.1, "b": 1.0, "c": 1.0}) == pytest.approx({"a": 0.1, "b": 0.45, "c": 0.45})
    assert max_min_shares(1.0, {"a": 0.2, "b": 0.3}) == {"a": 0.2, "b": 0.3}  # all met: the rest stays unused
    assert max_min_shares(1.0, {}) == {}


def _pair(budget: float = 1.0) -> tuple[PairShare, Link]:
    link = Link(SRC, DST, budget, TokenBucket(budget), LinkCounters(0.125))
    return PairShare(link, "me", LinkConfig(), hold_until=0.3), link  # announces every 0.15 s


def _heard(pair: PairShare, process: str, demand: float, rate: float, now: float) -> None:
    pair.heard(
        LinkShareAnnounce(
            src_site=SRC,
            dst_site=DST,
            process=process,
            budget_gbps=1.0,
            demand_gbps=demand,
            rate_gbps=rate,
            interval_s=0.15,
            seq=1,
        ),
        now,
    )


def test_a_starting_process_listens_first_then_waits_for_headroom():
    """Nothing leaves during the hold; then a process takes only what its peers have announced leaving."""
    pair, link = _pair()
    link.transfer_started("t")
    pair.activity()
    _heard(pair, "peer", demand=1.0, rate=1.0, now=0.1)  # a peer holding the whole budget
    pair.decide(0.2)
    assert link.bucket.rate_gbps == 0.0  # hold
    pair.decide(0.31)
    assert pair.rate_gbps == 0.0  # its fair share is 0.5, but the peer still lets out 1.0
    _heard(pair, "peer", demand=1.0, rate=0.5, now=0.32)  # the peer heard us and lowered
    assert pair.decide(0.33) and pair.rate_gbps == pytest.approx(0.5) and link.bucket.rate_gbps == pytest.approx(0.5)


def test_simultaneous_raises_split_the_headroom():
    """Two processes below their share raise into the same headroom by halves, never past the budget."""
    pair, link = _pair()
    link.transfer_started("t")
    pair.activity()
    _heard(pair, "leaving", demand=1.0, rate=0.5, now=0.3)  # still at 0.5 on its way down to 1/3
    _heard(pair, "other", demand=1.0, rate=0.0, now=0.3)  # as far from its share as we are
    pair.decide(0.31)
    assert pair.rate_gbps == pytest.approx(0.25)  # half of the 0.5 left: 0.5 + 0.25 + 0.25 = the budget


def test_lowering_is_immediate_and_a_silent_peer_is_forgotten():
    """A peer's demand halves our rate at once; once it is silent for six periods its share returns."""
    pair, link = _pair()
    link.transfer_started("t")
    pair.activity()
    pair.decide(0.31)
    assert pair.rate_gbps == 1.0  # alone
    _heard(pair, "peer", demand=1.0, rate=0.0, now=0.4)
    assert pair.decide(0.4) and pair.rate_gbps == pytest.approx(0.5)
    pair.decide(0.4 + 6 * 0.15 - 0.01)
    assert pair.rate_gbps == pytest.approx(0.5)  # still remembered
    pair.decide(0.4 + 6 * 0.15 + 0.01)
    assert pair.rate_gbps == 1.0 and not pair.peers


def test_a_producer_slower_than_its_share_leaves_the_rest():
    """Without waiting on its bucket, a process demands 1.25x what it let out; its peer gets the rest."""
    pair, link = _pair()
    link.transfer_started("t")
    pair.activity()
    pair.decide(0.31)
    pair.measure(0.31)
    assert link.bucket.take(200_000) == 0.0  # 200 kB let out over the next 0.1 s: 0.016 Gbps
    pair.measure(0.41)
    assert pair.demand_gbps == pytest.approx(0.02)
    _heard(pair, "peer", demand=1.0, rate=0.0, now=0.42)
    pair.decide(0.42)
    assert pair.rate_gbps == pytest.approx(0.02)


class _Greedy:
    """A transfer that always has bytes to send: a thread taking chunks from the link's bucket."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while self.link.bucket.wait_blocking(64 << 10, self.stop):
            pass

    def __enter__(self) -> _Greedy:
        self.link.transfer_started("t")
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.link.transfer_ended("t", ok=True)


async def test_processes_share_a_pair_over_nats(nats_url):
    """Two processes with demand get half each; one going idle or stopping hands its half back at once;
    one going silent is forgotten after a few periods; LINK_ALL readers see LinkStats only."""
    config = LinkConfig(default_budget_gbps=0.8, share_interval_s=0.05, publish_interval_s=0.05)
    ncs = [await connect(nats_url, name=f"share-{i}") for i in range(3)]
    stats: list[bytes] = []

    async def on_stats(msg) -> None:
        stats.append(msg.data)

    watcher = await ncs[2].subscribe(subjects.LINK_ALL, cb=on_stats)
    a, b = KvLinks(SRC, config, nc=ncs[0]), KvLinks(SRC, config, nc=ncs[1])
    try:
        await a.start()
        await b.start()
        link_a, link_b = a.link(DST), b.link(DST)
        with _Greedy(link_a):
            with _Greedy(link_b):
                await eventually(
                    lambda: (
                        link_a.bucket.rate_gbps == pytest.approx(0.4) and link_b.bucket.rate_gbps == pytest.approx(0.4)
                    ),
                    timeout_s=5,
                )
            await eventually(lambda: link_a.bucket.rate_gbps == pytest.approx(0.8), timeout_s=5)  # b idle
            with _Greedy(link_b):
                await eventually(lambda: link_b.bucket.rate_gbps == pytest.approx(0.4), timeout_s=5)
                await b.stop()
                assert link_b.bucket.rate_gbps == 0.0
                await eventually(lambda: link_a.bucket.rate_gbps == pytest.approx(0.8), timeout_s=5)
                # A process that goes silent without a word: its share comes back after six periods, not before.
                await b.start()
                await eventually(lambda: link_a.bucket.rate_gbps == pytest.approx(0.4), timeout_s=5)
                await ncs[1].close()
                silenced = time.monotonic()
                await eventually(lambda: link_a.bucket.rate_gbps == pytest.approx(0.8), timeout_s=5)
                # Forgotten 6 periods after its last announcement, at most one period before the silence.
                assert time.monotonic() - silenced >= 5 * config.share_interval_s
                # Its own lease ran out meanwhile: it lets nothing out (it cannot know the others took its share).
                assert link_b.bucket.take(1) > 0
    finally:
        await a.stop()
        await b.stop()
        await watcher.unsubscribe()
        for nc in ncs:
            await nc.close()
    assert stats and all(isinstance(link_stats_decoder.decode(data), LinkStats) for data in stats)
    senders = {link_stats_decoder.decode(data).sender for data in stats}
    assert senders == {a.process, b.process}


async def test_two_processes_at_a_site_stay_within_one_pair_budget(nats_url, tmp_path):
    """Two sender processes at one site together send within 5% of the pair's budget (bytes on the wire at
    the receiver), and one alone, the other idle, gets the whole budget."""
    budget_gbps, size = 0.4, 48 << 20  # 50 MB/s; two transfers of ~2 s together, one of ~1 s alone
    memory = ReceiverConfig(max_total_bytes=256 << 20, max_transfer_bytes=128 << 20, transfer_timeout_s=60.0)
    async with tcp_receiver(memory) as (receiver, server):
        port = server.address[1]
        senders = [
            Child(
                f"sender {i}",
                sender_process,
                SenderSpec("tcp", size, "raw", budget_gbps, 4, 4 << 20, nats_url, port, tmp_path / f"s{i}.log"),
            )
            for i in range(2)
        ]
        try:
            expected = [(await s.recv(timeout_s=60))[1] for s in senders][0]

            async def round_(tag: str, who: list[Child]) -> tuple[list[dict], list[tuple[float, int]]]:
                with WireSampler(server) as sampler:
                    for i, s in enumerate(who):
                        s.pipe.send(("send", f"t-{tag}-{i}"))
                    reports = [(await s.recv(timeout_s=60))[1] for s in who]
                for i in range(len(who)):
                    with await receiver.wait(f"t-{tag}-{i}", timeout_s=10) as done:
                        assert part_checksums(done.parts, DEFAULT_CHECKSUM) == expected
                return reports, sampler.samples

            reports, samples = await round_("together", senders)
            together = mean_gbps(samples, max(r["started"] for r in reports), min(r["ended"] for r in reports))
            together_window = max_window_gbps(samples)
            # Idle means idle: a process keeps its share for up to one period after its last transfer.
            await asyncio.sleep(2 * LinkConfig().share_interval_s)
            reports, samples = await round_("alone", senders[:1])
            alone = mean_gbps(samples, reports[0]["started"], reports[0]["ended"])
        finally:
            for s in senders:
                await s.stop()
    assert budget_gbps * 0.95 <= together <= budget_gbps * 1.05
    assert together_window <= budget_gbps * 1.05
    assert budget_gbps * 0.95 <= alone <= budget_gbps * 1.05


def test_announcements_do_not_decode_as_link_stats():
    """The two kinds are distinct tags: a LinkStats reader fed an announcement gets a decode error, not data."""
    data = msgspec.msgpack.encode(
        LinkShareAnnounce(
            src_site=SRC,
            dst_site=DST,
            process="p",
            budget_gbps=1.0,
            demand_gbps=0.0,
            rate_gbps=0.0,
            interval_s=0.15,
            seq=1,
        )
    )
    with pytest.raises(msgspec.ValidationError):
        link_stats_decoder.decode(data)
    assert not subjects.link_share(SRC, DST).startswith(subjects.LINK_ALL[:-1])
