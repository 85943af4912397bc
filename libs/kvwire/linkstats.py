"""Per site pair: the shared pacing bucket and traffic counters, published as ``LinkStats``.

A prefill gateway owns one ``KvLinks`` for its site; every transfer to a destination site uses
that pair's ``Link`` (bucket and counters), from the event loop or from socket threads. While
started, ``KvLinks`` publishes each pair's statistics every ``publish_interval_s`` on
``subjects.link(src, dst)``; a router subscribes to ``subjects.LINK_ALL`` and decodes them with
``messages.link_stats_decoder``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import nats.errors
from nats.aio.client import Client as NatsClient

from libs.common import subjects
from libs.common.messages import LinkStats, encode
from libs.kvwire.pacing import TokenBucket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkConfig:
    """Bandwidth budgets per destination site (Gbps, 0 = unpaced) and the telemetry period."""

    budgets_gbps: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    default_budget_gbps: float = 0.0
    # Bucket depth in seconds of budget: enough to absorb a sender's scheduling hiccups (an event
    # loop or a thread a few ms late keeps its tokens), small enough that no one-second window
    # carries more than ~2% over the budget.
    burst_s: float = 0.02
    min_burst_bytes: int = 256 << 10
    publish_interval_s: float = 1.0
    rtt_gain: float = 0.125  # EWMA gain of the smoothed RTT (as TCP's SRTT)

    def budget_gbps(self, dst_site: str) -> float:
        """Budget towards ``dst_site``."""
        return self.budgets_gbps.get(dst_site, self.default_budget_gbps)


class LinkCounters:
    """Thread-safe traffic counters of one site pair."""

    def __init__(self, rtt_gain: float) -> None:
        self._lock = threading.Lock()
        self._gain = rtt_gain
        self.bytes_in_flight = 0
        self.acked_bytes_total = 0
        self.retransmitted_bytes_total = 0
        self.retransmitted_chunks_total = 0
        self.transfers_completed_total = 0
        self.transfers_failed_total = 0
        self.active_transfers = 0
        self.srtt_s = 0.0
        self._min_rtt_s = 0.0
        self._busy_since: float | None = None
        self._busy_s = 0.0
        self._last_acked = 0
        self._last_ts = time.monotonic()

    def sent(self, nbytes: int) -> None:
        """Bytes put on the wire, not yet acknowledged."""
        with self._lock:
            self.bytes_in_flight += nbytes

    def acked(self, nbytes: int, rtt_s: float | None) -> None:
        """Bytes acknowledged, with the round trip of the ack when known."""
        with self._lock:
            self.bytes_in_flight -= nbytes
            self.acked_bytes_total += nbytes
            if rtt_s is not None:
                self.srtt_s = rtt_s if self.srtt_s == 0 else self.srtt_s + self._gain * (rtt_s - self.srtt_s)
                self._min_rtt_s = rtt_s if self._min_rtt_s == 0 else min(self._min_rtt_s, rtt_s)

    def lost(self, nbytes: int) -> None:
        """Bytes in flight that will never be acknowledged (broken connection, rejected chunk)."""
        with self._lock:
            self.bytes_in_flight -= nbytes

    def retransmitted(self, nbytes: int) -> None:
        """One chunk sent again."""
        with self._lock:
            self.retransmitted_bytes_total += nbytes
            self.retransmitted_chunks_total += 1

    def transfer_started(self) -> None:
        """A transfer began using the link."""
        with self._lock:
            if self.active_transfers == 0:
                self._busy_since = time.monotonic()
            self.active_transfers += 1

    def transfer_ended(self, ok: bool) -> None:
        """A transfer stopped using the link."""
        with self._lock:
            self.active_transfers -= 1
            if ok:
                self.transfers_completed_total += 1
            else:
                self.transfers_failed_total += 1
            if self.active_transfers == 0 and self._busy_since is not None:
                self._busy_s += time.monotonic() - self._busy_since
                self._busy_since = None

    def snapshot(self, src_site: str, dst_site: str, budget_gbps: float) -> LinkStats:
        """Statistics since the previous snapshot (interval figures reset)."""
        with self._lock:
            now = time.monotonic()
            interval_s = max(now - self._last_ts, 1e-9)
            busy_s = self._busy_s
            if self._busy_since is not None:
                busy_s += now - self._busy_since
                self._busy_since = now
            delta_bits = (self.acked_bytes_total - self._last_acked) * 8
            goodput_gbps = delta_bits / interval_s / 1e9
            stats = LinkStats(
                src_site=src_site,
                dst_site=dst_site,
                ts=time.time(),
                interval_s=interval_s,
                budget_gbps=budget_gbps,
                goodput_gbps=goodput_gbps,
                busy_goodput_gbps=delta_bits / busy_s / 1e9 if busy_s > 0 else 0.0,
                utilization=goodput_gbps / budget_gbps if budget_gbps > 0 else 0.0,
                rtt_s=self.srtt_s,
                min_rtt_s=self._min_rtt_s,
                bytes_in_flight=max(0, self.bytes_in_flight),
                active_transfers=self.active_transfers,
                acked_bytes_total=self.acked_bytes_total,
                retransmitted_bytes_total=self.retransmitted_bytes_total,
                retransmitted_chunks_total=self.retransmitted_chunks_total,
                transfers_completed_total=self.transfers_completed_total,
                transfers_failed_total=self.transfers_failed_total,
            )
            self._last_acked = self.acked_bytes_total
            self._last_ts = now
            self._busy_s = 0.0
            self._min_rtt_s = 0.0
            return stats


@dataclass(frozen=True)
class Link:
    """One direction between two sites: its pacing bucket and its counters."""

    src_site: str
    dst_site: str
    bucket: TokenBucket
    counters: LinkCounters

    def stats(self) -> LinkStats:
        """Take a snapshot (resets the interval figures)."""
        return self.counters.snapshot(self.src_site, self.dst_site, self.bucket.rate_gbps)


class KvLinks:
    """Pacing and telemetry of KV traffic from ``src_site`` to every destination site."""

    def __init__(self, src_site: str, config: LinkConfig | None = None, nc: NatsClient | None = None) -> None:
        self.src_site = subjects.token(src_site, "site")
        self.config = config or LinkConfig()
        self._nc = nc
        self._links: dict[str, Link] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None

    def link(self, dst_site: str) -> Link:
        """The shared link towards ``dst_site`` (created on first use)."""
        with self._lock:
            found = self._links.get(dst_site)
            if found is None:
                rate = self.config.budget_gbps(dst_site)
                burst = max(int(rate * 1e9 / 8 * self.config.burst_s), self.config.min_burst_bytes)
                found = Link(self.src_site, subjects.token(dst_site, "site"), TokenBucket(rate, burst),
                             LinkCounters(self.config.rtt_gain))
                self._links[dst_site] = found
            return found

    async def start(self) -> None:
        """Start publishing link statistics (when a NATS client was given)."""
        if self._nc is not None and self._task is None:
            self._task = asyncio.create_task(self._publish_loop(self._nc), name=f"kv-links-{self.src_site}")

    async def stop(self) -> None:
        """Stop publishing (idempotent)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> KvLinks:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _publish_loop(self, nc: NatsClient) -> None:
        while True:
            await asyncio.sleep(self.config.publish_interval_s)
            with self._lock:
                links = list(self._links.values())
            for link in links:
                try:
                    await nc.publish(subjects.link(link.src_site, link.dst_site), encode(link.stats()))
                except (nats.errors.Error, OSError) as e:  # telemetry goes on; the client reconnects
                    log.warning("link stats not published", extra={"dst_site": link.dst_site, "error": repr(e)})
