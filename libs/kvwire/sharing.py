"""A site pair's budget shared by every process of the source site, over NATS.

Prefill gateways at one site (several processes, possibly on several hosts) each own a
``KvLinks``; together they must stay within each pair's budget. Every process announces, for each
paced pair it uses, its demand and the rate its bucket lets out (``LinkShareAnnounce`` on
``subjects.link_share(src, dst)``) every ``share_interval_s``, and at once when either changes.
Each takes its max-min fair share of the budget among the processes with demand:

- Lowering is immediate. Raising only fills the headroom the others announce (the budget less
  every announced rate), split among the processes below their share in proportion to what they
  lack, so simultaneous raises do not add up past the budget.
- At start a process lets nothing out for ``share_hold_intervals``: the time to hear every peer
  (it listens to every pair of its site, so a pair it starts using later needs no new hold).
- A peer silent for ``share_expire_intervals`` of its period is forgotten and its share returns.
  A process's own bucket runs on a lease renewed by every announcement the server confirmed, and
  the lease is shorter than the peers' memory: a process cut off from the bus (or too starved to
  announce) pauses before anyone takes its share.
- Stopping announces zero, so the others take the share back at once.

Demand: the whole budget as soon as a transfer starts and while the bucket makes senders wait;
else, while transfers are active, 1.25 x what was let out over the last interval (a producer
slower than its share leaves the rest to the others); 0 once a whole period passed idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NatsClient
from prometheus_client import Counter

from libs.common import subjects
from libs.common.errors import BadRequest
from libs.common.handling import decoded_or_none, own_bad_messages
from libs.common.messages import LinkShareAnnounce, encode, link_share_announce_decoder
from libs.kvwire.link import Link, LinkConfig

log = logging.getLogger(__name__)

APP_LIMITED_HEADROOM = 1.25  # demand of a sender its producer limits: this much over what it let out


def process_id() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def max_min_shares(budget: float, demands: Mapping[str, float]) -> dict[str, float]:
    """Max-min fair shares of ``budget``: the smallest demands are met first, the rest split equally."""
    shares: dict[str, float] = {}
    remaining = budget
    ordered = sorted(demands.items(), key=lambda item: (item[1], item[0]))
    for i, (who, demand) in enumerate(ordered):
        shares[who] = min(demand, remaining / (len(ordered) - i))
        remaining -= shares[who]
    return shares


@dataclass
class _Peer:
    demand_gbps: float
    rate_gbps: float
    interval_s: float
    seen: float  # monotonic s

    @classmethod
    def of(cls, msg: LinkShareAnnounce, now: float) -> _Peer:
        return cls(msg.demand_gbps, msg.rate_gbps, msg.interval_s, now)


class PairShare:
    """This process's share of one pair: what it heard, what it wants, what it lets out (no I/O)."""

    def __init__(
        self, link: Link, process: str, config: LinkConfig, hold_until: float, peers: dict[str, _Peer] | None = None
    ) -> None:
        self.link = link
        self.process = process
        self.config = config
        self.peers: dict[str, _Peer] = dict(peers or {})
        self.demand_gbps = 0.0
        self.rate_gbps = 0.0
        self.hold_until = hold_until  # nothing leaves before: the time to have heard every peer
        self.starved = False  # set from sender threads: a sender waited since the last decision
        self.seq = 0
        self._granted = link.bucket.granted_bytes
        self._measured_at = time.monotonic()
        link.bucket.set_rate(0.0)

    def heard(self, msg: LinkShareAnnounce, now: float) -> None:
        """Record a peer's announcement."""
        self.peers[msg.process] = _Peer.of(msg, now)

    def measure(self, now: float) -> None:
        """Estimate the demand from the interval since the last call."""
        bucket = self.link.bucket
        granted = bucket.granted_bytes
        sent_gbps = (granted - self._granted) * 8 / max(now - self._measured_at, 1e-3) / 1e9
        self._granted, self._measured_at = granted, now
        limited = bucket.take_limited() or self.starved
        self.starved = False
        if self.link.counters.active_transfers == 0:
            self.demand_gbps = 0.0
        elif limited:
            self.demand_gbps = self.link.budget_gbps
        else:
            self.demand_gbps = min(self.link.budget_gbps, sent_gbps * APP_LIMITED_HEADROOM)

    def activity(self) -> bool:
        """Transfers started: want the whole budget at once (True). When the last ends, the share
        stays until the next period's measure (False): back-to-back transfers do not hand it back and
        forth."""
        if self.link.counters.active_transfers == 0:
            return False
        self.demand_gbps = self.link.budget_gbps
        return True

    def _live(self, now: float) -> dict[str, _Peer]:
        expire = self.config.share_expire_intervals
        self.peers = {p: peer for p, peer in self.peers.items() if now - peer.seen <= expire * peer.interval_s}
        return self.peers

    def decide(self, now: float) -> bool:
        """Set the bucket's rate from what is known now; True if it changed."""
        budget = self.link.budget_gbps
        if self.starved and self.link.counters.active_transfers > 0:
            self.demand_gbps = budget
        live = self._live(now)
        if now < self.hold_until:
            rate = 0.0
        else:
            demands = {p: peer.demand_gbps for p, peer in live.items() if peer.demand_gbps > 0}
            if self.demand_gbps > 0:
                demands[self.process] = self.demand_gbps
            shares = max_min_shares(budget, demands)
            target = shares.get(self.process, 0.0)
            if target <= self.rate_gbps:
                rate = target
            else:
                rates = {p: peer.rate_gbps for p, peer in live.items()} | {self.process: self.rate_gbps}
                headroom = budget - sum(rates.values())
                lacking = {p: max(0.0, shares.get(p, 0.0) - rates[p]) for p in rates}
                rate = self.rate_gbps + max(0.0, headroom) * lacking[self.process] / sum(lacking.values())
                rate = min(rate, target)
        if abs(rate - self.rate_gbps) <= budget * 1e-6:
            return False
        self.rate_gbps = rate
        self.link.bucket.set_rate(rate)
        return True

    def announce(self) -> LinkShareAnnounce:
        """This process's announcement for the pair."""
        self.seq += 1
        return LinkShareAnnounce(
            src_site=self.link.src_site,
            dst_site=self.link.dst_site,
            process=self.process,
            budget_gbps=self.link.budget_gbps,
            demand_gbps=self.demand_gbps,
            rate_gbps=self.rate_gbps,
            interval_s=self.config.share_interval_s,
            seq=self.seq,
        )


class SiteShares:
    """Announces and applies this process's shares of every shared pair (owned by ``KvLinks``)."""

    def __init__(
        self, nc: NatsClient, src_site: str, process: str, config: LinkConfig, bad_messages: Counter | None = None
    ) -> None:
        self.nc = nc
        self.src_site = src_site
        self.process = process
        self.config = config
        self.pairs: dict[str, PairShare] = {}
        self.bad_messages = bad_messages or own_bad_messages("prfaas_link_share_bad_messages", "subject")
        self._heard: dict[str, dict[str, _Peer]] = {}  # peers of pairs this process does not use yet
        self._warned: set[tuple[str, str]] = set()  # (peer, pair) announced with a budget other than ours
        self._listening_since = 0.0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sub = None
        self._task: asyncio.Task[None] | None = None
        self._confirming: asyncio.Task[None] | None = None

    def add(self, link: Link) -> None:
        """Share ``link``'s budget from now on (call after ``start``; its bucket pauses until the first decision)."""
        hold_until = self._listening_since + self.config.share_hold_intervals * self.config.share_interval_s
        pair = PairShare(link, self.process, self.config, hold_until, self._heard.pop(link.dst_site, None))
        link.bucket.renew_lease(0.0)  # nothing leaves before an announcement is confirmed
        link.bucket.on_limited = lambda: self._starved(pair)
        link.on_activity = lambda: self._activity(pair)
        self.pairs[link.dst_site] = pair
        self._wake.set()

    async def start(self) -> None:
        """Listen to the site's announcements and start announcing."""
        self._loop = asyncio.get_running_loop()
        self._listening_since = time.monotonic()
        self._sub = await self.nc.subscribe(subjects.link_share(self.src_site, "*"), cb=self._on_announce)
        self._task = asyncio.create_task(self._run(), name=f"kv-shares-{self.src_site}")

    async def stop(self) -> None:
        """Stop announcing; pause every shared bucket and announce zero so the others take the share back."""
        for task in (self._task, self._confirming):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._confirming = None
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
        for pair in self.pairs.values():
            pair.demand_gbps = pair.rate_gbps = 0.0
            pair.link.bucket.set_rate(0.0)
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await self._announce(list(self.pairs.values()), renew=False)
            await self.nc.flush(timeout=self.config.share_interval_s * 2)

    def _starved(self, pair: PairShare) -> None:
        """A sender of ``pair`` had to wait (called from any thread)."""
        pair.starved = True
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed
                self._loop.call_soon_threadsafe(self._wake.set)

    def _activity(self, pair: PairShare) -> None:
        """The pair's first transfer started, or its last ended (on the loop)."""
        if pair.activity():
            self._wake.set()

    def _sane(self, announce: LinkShareAnnounce) -> None:
        """``BadRequest`` for an announcement no process of this site sends."""
        if announce.src_site != self.src_site or not announce.process or not announce.interval_s > 0:
            raise BadRequest("an announcement needs this site as its source, a process and an interval > 0")
        subjects.token(announce.dst_site, "site")

    async def _on_announce(self, msg) -> None:
        announce = decoded_or_none(link_share_announce_decoder, msg, "link_share", self.bad_messages, self._sane)
        if announce is None or announce.process == self.process:
            return
        now = time.monotonic()
        pair = self.pairs.get(announce.dst_site)
        if pair is None:  # remembered for when this process starts using the pair
            self._heard.setdefault(announce.dst_site, {})[announce.process] = _Peer.of(announce, now)
            return
        if announce.budget_gbps != pair.link.budget_gbps and (announce.process, announce.dst_site) not in self._warned:
            self._warned.add((announce.process, announce.dst_site))
            log.warning(
                "a peer shares this pair with another budget; each process keeps to its own",
                extra={
                    "dst_site": announce.dst_site,
                    "peer": announce.process,
                    "peer_budget_gbps": announce.budget_gbps,
                    "budget_gbps": pair.link.budget_gbps,
                },
            )
        pair.heard(announce, now)
        self._wake.set()

    async def _run(self) -> None:
        interval = self.config.share_interval_s
        next_tick = time.monotonic()
        while True:
            now = time.monotonic()
            holds = [p.hold_until for p in self.pairs.values() if p.hold_until > now]
            delay = min([next_tick, *holds]) - now
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
            self._wake.clear()
            now = time.monotonic()
            tick = now >= next_tick
            if tick:
                next_tick = now + interval
                self._forget_silent(now)
            changed = []
            for pair in list(self.pairs.values()):
                try:
                    if tick:
                        pair.measure(now)
                    if pair.decide(now) or tick:
                        changed.append(pair)
                except Exception:  # a control loop: keep the last rate (the lease bounds it) and go on
                    log.exception("link share decision failed", extra={"dst_site": pair.link.dst_site})
            if changed:
                try:
                    await self._announce(changed, renew=tick)
                except (nats.errors.Error, OSError, TimeoutError) as e:  # the lease runs out; the client reconnects
                    log.warning("link share not announced", extra={"site": self.src_site, "error": repr(e)})

    def _forget_silent(self, now: float) -> None:
        """Drop what was heard about unused pairs from peers silent too long."""
        expire = self.config.share_expire_intervals
        for dst_site, peers in list(self._heard.items()):
            live = {p: peer for p, peer in peers.items() if now - peer.seen <= expire * peer.interval_s}
            if live:
                self._heard[dst_site] = live
            else:
                del self._heard[dst_site]

    async def _announce(self, pairs: list[PairShare], renew: bool) -> None:
        """Publish the pairs' announcements; with ``renew``, extend the leases once the server confirms them."""
        sent_at = time.monotonic()
        for pair in pairs:
            await self.nc.publish(subjects.link_share(self.src_site, pair.link.dst_site), encode(pair.announce()))
        if renew and (self._confirming is None or self._confirming.done()):
            self._confirming = asyncio.create_task(self._confirm(sent_at), name=f"kv-shares-confirm-{self.src_site}")

    async def _confirm(self, sent_at: float) -> None:
        """Renew every lease once the server has the announcements sent at ``sent_at`` (off the decision loop).

        The lease runs from the sending, not the confirmation: the peers' memory of this process
        starts no earlier, so the lease always ends before they forget it.
        """
        lease = sent_at + self.config.share_lease_intervals * self.config.share_interval_s
        try:
            await self.nc.flush(timeout=max(lease - time.monotonic(), 1e-3))
        except (nats.errors.Error, OSError, TimeoutError) as e:  # the lease runs out; the client reconnects
            log.warning("link share announcements not confirmed", extra={"site": self.src_site, "error": repr(e)})
            return
        for pair in self.pairs.values():
            pair.link.bucket.renew_lease(lease)
