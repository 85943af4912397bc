"""Per site pair: the pacing bucket and traffic counters, published as ``LinkStats``.

A prefill gateway owns one ``KvLinks`` for its site; every transfer to a destination site uses
that pair's ``Link`` (bucket and counters), from the event loop or from socket threads. While
started with a NATS client, ``KvLinks`` publishes each pair's statistics every
``publish_interval_s`` on ``subjects.link(src, dst)`` (one ``LinkStats`` per process, named by
``sender``: a router adds up the processes of a pair), and shares each paced pair's budget with
the other processes of its site (``libs.kvwire.sharing``).

Besides goodput and RTT, each pair counts the time the link, not the sender, set the pace
(``LinkStats.limited_s``) and what was acknowledged meanwhile, as a TCP sender marks its rate samples
app-limited or not: a sample taken while the sender had nothing waiting on the link (its transfers
waiting for the engine's next layer, sparse requests) says what the sender offered, not what the link
can carry. Two things show that KV waited on the link:

- a send waited for room in its transfer's window (the transports call ``window_wait``): every ack
  meanwhile came at the link's pace;
- a run of acks for chunks that were sent before the previous ack arrived (they waited in flight)
  came spread out more than ``SPREAD_FACTOR`` times as far as those chunks were sent: the link
  drained them slower than the sender put them out. The run is judged whole so far, so one whose
  first part was paced by the prefill counts whole once the link shows in it. A constant extra
  delay (a busy CPU acking late, at either end) shifts acks without spreading them, and a sender
  paced by its budget or by its prefill spreads its sends as much as the acks come.

No goodput of a paced pair is reported above its budget but for the pacer's burst (``burst_s`` of
budget over the time a figure is over):

- acks handled late and together (a stalled event loop) are counted over the time their chunks were
  sent when that is longer than the interval (``interval_s`` is then that time), and busy goodput
  over the busy time they were sent in;
- the busy time counts the tokens the bucket held when it began to be counted (a transfer starting
  on an idle link, a new interval) as the time they were saved in: a transfer's first burst does not
  make a short busy time look fast;
- a limited rate above the budget shows a link faster than the budget, not one that limits: it is
  not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NatsClient
from prometheus_client import Counter

from libs.common import subjects
from libs.common.messages import LinkStats, encode
from libs.kvwire.link import Link, LinkConfig
from libs.kvwire.pacing import TokenBucket
from libs.kvwire.sharing import SiteShares, process_id

log = logging.getLogger(__name__)

SPREAD_FACTOR = 2.0  # acks this many times as spread out as their chunks' sends: the link set the pace


@dataclass
class _AckRun:
    """Acks in a row whose chunks had been sent before the previous ack: each waited in flight."""

    first_ack_at: float  # the ack just before the run
    first_sent_at: float  # when that ack's chunk was sent
    last_ack_at: float
    last_sent_at: float  # the latest send among the run's chunks
    counted_to: float  # the run is counted up to this ack (first_ack_at: nothing counted yet)
    acked_bytes: int = 0
    counted_bytes: int = 0

    def take(self) -> tuple[float, int]:
        """(seconds, bytes) the link set the pace over not counted yet; (0, 0) while the whole run was not spread."""
        ack_s = self.last_ack_at - self.first_ack_at
        if ack_s <= SPREAD_FACTOR * max(0.0, self.last_sent_at - self.first_sent_at):
            return 0.0, 0
        taken = self.last_ack_at - self.counted_to
        nbytes = self.acked_bytes - self.counted_bytes
        self.counted_to, self.counted_bytes = self.last_ack_at, self.acked_bytes
        return taken, nbytes


class LinkCounters:
    """Thread-safe traffic counters of one site pair (``clock``: monotonic seconds)."""

    def __init__(
        self,
        rtt_gain: float,
        clock: Callable[[], float] = time.monotonic,
        held_s: Callable[[], float] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._held_s = held_s or (lambda: 0.0)  # seconds of budget the pacer holds now (0: unpaced)
        self._gain = rtt_gain
        self._clock = clock
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
        self._busy_base = 0.0  # the busy clock (busy seconds since start, credits included) at _busy_since
        self._sent_lo: tuple[float, float] | None = (
            None  # (wall, busy clock) of the earliest send acked in the interval
        )
        self._sent_hi: tuple[float, float] = (0.0, 0.0)  # ... and of the latest
        self._last_acked = 0
        self._last_ts = clock()
        self._window_waits = 0  # sends waiting for room in their transfer's window
        self._waiting_since = 0.0
        self._ack_at: float | None = None  # the latest ack, and when its chunk was sent
        self._ack_sent_at = 0.0
        self._run: _AckRun | None = None
        self._limited_s = 0.0
        self._limited_bytes = 0

    def sent(self, nbytes: int) -> None:
        """Bytes put on the wire, not yet acknowledged."""
        with self._lock:
            self.bytes_in_flight += nbytes

    def acked(self, nbytes: int, rtt_s: float | None) -> None:
        """Bytes acknowledged, with the round trip of the ack when known."""
        with self._lock:
            now = self._clock()
            self.bytes_in_flight -= nbytes
            self.acked_bytes_total += nbytes
            if rtt_s is not None:
                self.srtt_s = rtt_s if self.srtt_s == 0 else self.srtt_s + self._gain * (rtt_s - self.srtt_s)
                self._min_rtt_s = rtt_s if self._min_rtt_s == 0 else min(self._min_rtt_s, rtt_s)
            sent_at = now if rtt_s is None else now - rtt_s
            self._span_send(now, sent_at)
            if self._window_waits:
                self._end_run()
                self._limited_s += now - max(now if self._ack_at is None else self._ack_at, self._waiting_since)
                self._limited_bytes += nbytes
            elif rtt_s is not None and self._ack_at is not None and sent_at <= self._ack_at:
                if self._run is None:
                    self._run = _AckRun(self._ack_at, self._ack_sent_at, now, sent_at, counted_to=self._ack_at)
                self._run.last_ack_at = now
                self._run.last_sent_at = max(self._run.last_sent_at, sent_at)
                self._run.acked_bytes += nbytes
            else:
                self._end_run()
            self._ack_at, self._ack_sent_at = now, sent_at

    def _busy_clock(self, now: float) -> float:
        """Busy seconds since start at ``now`` (lock held)."""
        return self._busy_base + (now - self._busy_since if self._busy_since is not None else 0.0)

    def _span_send(self, now: float, sent_at: float) -> None:
        """Widen the interval's span of send times by an acked chunk's (its transfer was busy since; lock held)."""
        sent = (sent_at, self._busy_clock(now) - (now - sent_at))
        self._sent_lo = sent if self._sent_lo is None else min(self._sent_lo, sent)
        self._sent_hi = max(self._sent_hi, sent)

    def _end_run(self) -> None:
        """Count what the link spread of the current run and close it (lock held)."""
        self._count_run()
        self._run = None

    def _count_run(self) -> None:
        """Count what the link spread of the current run so far, judged on the whole run (lock held)."""
        if self._run is not None:
            seconds, nbytes = self._run.take()
            self._limited_s += seconds
            self._limited_bytes += nbytes

    @contextlib.contextmanager
    def window_wait(self, full: bool = True) -> Iterator[None]:
        """Around a send's wait for room in its transfer's window (``full``: it does wait): the link sets the pace."""
        if not full:
            yield
            return
        with self._lock:
            if self._window_waits == 0:
                self._waiting_since = self._clock()
            self._window_waits += 1
        try:
            yield
        finally:
            with self._lock:
                self._window_waits -= 1

    def lost(self, nbytes: int) -> None:
        """Bytes in flight that will never be acknowledged (broken connection, rejected chunk)."""
        with self._lock:
            self.bytes_in_flight -= nbytes

    def retransmitted(self, nbytes: int) -> None:
        """One chunk sent again."""
        with self._lock:
            self.retransmitted_bytes_total += nbytes
            self.retransmitted_chunks_total += 1

    def transfer_started(self) -> int:
        """A transfer began using the link; the transfers now active."""
        held_s = self._held_s()  # the burst it may send at once: saved while the link was idle
        with self._lock:
            if self.active_transfers == 0:
                self._busy_since = self._clock() - held_s
                self._busy_base -= held_s  # the busy clock runs on from where it stopped (the credit is busy_s's)
            self.active_transfers += 1
            return self.active_transfers

    def transfer_ended(self, ok: bool) -> int:
        """A transfer stopped using the link; the transfers still active."""
        with self._lock:
            self.active_transfers -= 1
            if ok:
                self.transfers_completed_total += 1
            else:
                self.transfers_failed_total += 1
            if self.active_transfers == 0 and self._busy_since is not None:
                self._busy_s += self._clock() - self._busy_since
                self._busy_base = self._busy_clock(self._clock())
                self._busy_since = None
            return self.active_transfers

    def snapshot(self, src_site: str, dst_site: str, budget_gbps: float, sender: str = "") -> LinkStats:
        """Statistics since the previous snapshot (interval figures reset)."""
        held_s = self._held_s()
        with self._lock:
            now = self._clock()
            self._count_run()  # a run that goes on is judged whole again at its next count
            limited_s = self._limited_s
            busy_s = self._busy_s
            if self._busy_since is not None:
                busy_s += now - self._busy_since
                self._busy_base = self._busy_clock(now) - held_s
                self._busy_since = now - held_s
            if self._sent_lo is not None:  # acks handled late: over the time their chunks were sent, if longer
                busy_s = max(busy_s, self._sent_hi[1] - self._sent_lo[1])
            interval_s = max(now - self._last_ts, self._sent_hi[0] - self._sent_lo[0] if self._sent_lo else 0.0, 1e-9)
            delta_bits = (self.acked_bytes_total - self._last_acked) * 8
            goodput_gbps = delta_bits / interval_s / 1e9
            limited_gbps = self._limited_bytes * 8 / limited_s / 1e9 if limited_s > 0 else 0.0
            if 0 < budget_gbps < limited_gbps:  # acks faster than the budget: the link did not limit
                limited_s = limited_gbps = 0.0
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
                sender=sender,
                limited_s=limited_s,
                limited_goodput_gbps=limited_gbps,
            )
            self._last_acked = self.acked_bytes_total
            self._last_ts = now
            self._sent_lo, self._sent_hi = None, (0.0, 0.0)
            self._busy_s = 0.0
            self._min_rtt_s = 0.0
            self._limited_s = 0.0
            self._limited_bytes = 0
            return stats


class KvLinks:
    """Pacing and telemetry of KV traffic from ``src_site`` to every destination site."""

    def __init__(
        self,
        src_site: str,
        config: LinkConfig | None = None,
        nc: NatsClient | None = None,
        bad_messages: Counter | None = None,
    ) -> None:
        self.src_site = subjects.token(src_site, "site")
        self.config = config or LinkConfig()
        self.process = process_id()
        self._nc = nc
        self._links: dict[str, Link] = {}
        self._lock = threading.Lock()
        self._task: asyncio.Task[None] | None = None
        self._shares = (
            SiteShares(nc, self.src_site, self.process, self.config, bad_messages)
            if nc and self.config.share_site
            else None
        )
        self._sharing = False

    def link(self, dst_site: str) -> Link:
        """The shared link towards ``dst_site`` (created on first use)."""
        with self._lock:
            found = self._links.get(dst_site)
            if found is not None:
                return found
            budget = self.config.budget_gbps(dst_site)
            bucket = TokenBucket(budget, self.config.burst_s, self.config.min_burst_bytes)
            found = Link(
                self.src_site,
                subjects.token(dst_site, "site"),
                budget,
                bucket,
                LinkCounters(self.config.rtt_gain, held_s=_held_s(bucket, budget)),
            )
            self._links[dst_site] = found
            share = self._sharing and budget > 0
        if share:
            self._shares.add(found)
        return found

    async def start(self) -> None:
        """With a NATS client: start sharing paced pairs' budgets and publishing link statistics."""
        if self._nc is None or self._task is not None:
            return
        if self._shares is not None:
            await self._shares.start()
            for dst_site in self.config.budgets_gbps:
                self.link(dst_site)
            with self._lock:
                self._sharing = True
                paced = [link for link in self._links.values() if link.budget_gbps > 0]
            for link in paced:
                self._shares.add(link)
        self._task = asyncio.create_task(self._publish_loop(self._nc), name=f"kv-links-{self.src_site}")

    async def stop(self) -> None:
        """Stop publishing and sharing (idempotent); shared pairs pause and their share goes back to the site."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._shares is not None and self._sharing:
            self._sharing = False
            await self._shares.stop()

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
                    await nc.publish(subjects.link(link.src_site, link.dst_site), encode(link.stats(self.process)))
                except (nats.errors.Error, OSError) as e:  # telemetry goes on; the client reconnects
                    log.warning("link stats not published", extra={"dst_site": link.dst_site, "error": repr(e)})


def _held_s(bucket: TokenBucket, budget_gbps: float) -> Callable[[], float] | None:
    """Seconds of the pair's budget the bucket holds now (None for an unpaced pair: no burst to count)."""
    if budget_gbps == 0:
        return None
    return lambda: bucket.held_bytes() * 8 / (budget_gbps * 1e9)
