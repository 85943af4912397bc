"""Link telemetry as a router knows it: the LinkStats senders publish, combined into one LinkView per site pair.

Every prefill gateway process publishes a ``LinkStats`` per destination site once a second
(``libs/kvwire/linkstats.py``): goodput over the interval, busy goodput (over the time a transfer
was active), the time KV waited on the link and the goodput meanwhile, utilisation against its
pacing budget, smoothed ack RTT, bytes in flight, active transfers. What that can and cannot tell:

- A paced sender never delivers more than its budget and an idle link delivers nothing, so goodput
  says what the link carries, not what it could: the capacity is the pair's budget (or, unpaced,
  its provisioned figure).
- A link that delivers less than the senders offer makes KV wait on it: a send waits for room in its
  window, or chunks already in flight are acknowledged spread out more than they were sent. Senders
  count that time (``limited_s``) and what was acknowledged meanwhile (``limited_goodput_gbps``), as a
  TCP sender keeps only the rate samples that were not app-limited. Only that rate says what the link
  delivers: goodput and busy goodput are what the senders offered (a transfer waiting for its
  prefill's next layer, or a request now and then), and an ack round trip above its base may be a
  busy CPU acking late. The rate held for most of the limited time of the last ``bottleneck_window_s``
  (the time-weighted median: a few acks bunched up at a fast moment, or a run spread by a stall, weigh
  only the little time they cover) becomes the ``deliverable_gbps`` estimate once that time reaches
  ``min_limited_s`` (a stalled receiver spreads one transfer's acks for up to ~0.1 s; a degraded link
  with backlogged transfers shows about a second per second, and 2 MB at 20 Mbps 0.9 s). It is
  trusted for ``hold_s`` after the last limited sample, then grows back towards the capacity by
  ``probe_per_s`` per second (a link that is still degraded makes KV wait again once traffic is
  routed past its rate; a recovered one does not). The queueing delay (RTT above the least of
  ``base_rtt_window_s``) counts only while KV waits on the link or it is read as slower than its
  capacity.
- Several processes may publish for one pair: goodput, bytes in flight and active transfers are
  summed over them, and their limited periods may not overlap, so what the link delivered while KV
  waited is the senders' acknowledged bytes over the longest of their limited times (exact when they
  overlap, more than the link delivered when they do not); the budget is the pair's, shared by them.
- A sender silent for ``stale_after_s`` no longer counts. With none left the view carries no load
  figures, keeps the bandwidth estimate, and ``age_s`` says how old the newest sample is.

Pure: the caller passes the time a sample was received and the time a view is wanted.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, fields
from itertools import accumulate

from libs.common.errors import ConfigError
from libs.common.messages import LinkStats
from libs.policy.view import LinkView


@dataclass(frozen=True)
class TelemetryConfig:
    """How a router smooths and interprets LinkStats."""

    smoothing_s: float = 5.0  # time constant of the goodput average
    stale_after_s: float = 3.5  # a sender silent this long no longer counts
    min_limited_s: float = 0.5  # limited time needed before its rate reads as deliverable ...
    bottleneck_window_s: float = 10.0  # ... pooled over limited samples this recent ...
    hold_s: float = 30.0  # ... trusted this long after the last limited sample ...
    probe_per_s: float = 0.05  # ... then grows back towards capacity by this fraction per second
    base_rtt_window_s: float = 120.0  # the base RTT is the least one seen over this window
    transfer_size_gain: float = 1 / 32  # weight of each completed transfer in the mean transfer size

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"telemetry {f.name} must be a positive number, got {value!r}")
        if self.transfer_size_gain > 1:
            raise ConfigError(f"telemetry transfer_size_gain must be at most 1, got {self.transfer_size_gain!r}")


class _Pair:
    """What is known of one site pair."""

    __slots__ = (
        "senders",
        "goodput_gbps",
        "queue_delay_s",
        "rtt_s",
        "bytes_in_flight",
        "active_transfers",
        "budget_gbps",
        "peak_gbps",
        "updated_at",
        "limited",
        "limited_gbps",
        "bottleneck_at",
        "base_rtts",
        "mean_transfer_bytes",
        "uncounted_bytes",
        "uncounted_transfers",
        "counting",
        "proven_gbps",
        "waiting",
    )

    def __init__(self) -> None:
        self.senders: dict[str, tuple[LinkStats, float]] = {}  # sender -> (latest sample, received at)
        self.goodput_gbps = 0.0  # smoothed
        self.proven_gbps = 0.0  # the most the senders' latest samples added up to since KV last waited on the link
        self.queue_delay_s = 0.0  # RTT above base: queueing if the link is slow, else late acks (a busy CPU)
        self.waiting = False  # the latest samples show KV waiting on the link
        self.rtt_s = 0.0
        self.bytes_in_flight = 0
        self.active_transfers = 0
        self.budget_gbps = 0.0
        self.peak_gbps = 0.0  # highest busy goodput seen (the capacity of an unpaced, unprovisioned pair)
        self.updated_at: float | None = None
        self.limited: deque[tuple[float, float, float]] = deque()  # (received at, Gbps, seconds) KV waited on the link
        self.limited_gbps: float | None = None  # their pooled rate, once they add up to min_limited_s
        self.bottleneck_at = 0.0  # when a sample last showed KV waiting on the link
        self.base_rtts: deque[tuple[float, float]] = deque()  # (received at, RTT), RTTs increasing: front is least
        self.mean_transfer_bytes = 0.0  # acknowledged bytes per completed transfer (0: none completed yet)
        self.uncounted_bytes = 0  # acknowledged since the last completion folded into the mean
        self.uncounted_transfers = 0
        self.counting = False  # False until a first completion: bytes before it may belong to earlier transfers


def _push_min(window: deque[tuple[float, float]], at: float, value: float) -> None:
    """Append to a sliding-window minimum (drops entries that can no longer be the least)."""
    while window and window[-1][1] >= value:
        window.pop()
    window.append((at, value))


def _held_rate(limited: deque[tuple[float, float, float]], min_limited_s: float) -> float | None:
    """The rate held for most of the limited time (time-weighted median), or None below ``min_limited_s`` of it."""
    total_s = sum(seconds for _, _, seconds in limited)
    if total_s < min_limited_s:
        return None
    rates = sorted((gbps, seconds) for _, gbps, seconds in limited)
    covered_s = list(accumulate(seconds for _, seconds in rates))
    return rates[bisect_left(covered_s, covered_s[-1] / 2)][0]


class LinkTelemetry:
    """Accumulates LinkStats (from any number of senders) and answers the LinkView of a pair at ``now``."""

    def __init__(
        self,
        config: TelemetryConfig | None = None,
        capacity_gbps: Mapping[tuple[str, str], float] | None = None,
        default_capacity_gbps: float | None = None,
    ) -> None:
        self.config = config or TelemetryConfig()
        self._capacity = dict(capacity_gbps or {})  # provisioned figure of unpaced pairs
        self._default_capacity = default_capacity_gbps
        self._pairs: dict[tuple[str, str], _Pair] = {}

    def ingest(self, stats: LinkStats, received_at: float, sender: str | None = None) -> None:
        """Take one sample; samples of one sender (default: ``stats.sender``) replace each other."""
        sender = stats.sender if sender is None else sender
        key = (stats.src_site, stats.dst_site)
        pair = self._pairs.get(key)
        if pair is None:
            pair = self._pairs[key] = _Pair()
        previous = pair.senders.get(sender)
        if previous is not None:
            self._count_transfers(pair, previous[0], stats)
        pair.senders[sender] = (stats, received_at)
        self._fold(pair, received_at, stats.limited_s)

    def _count_transfers(self, pair: _Pair, before: LinkStats, after: LinkStats) -> None:
        """Fold the bytes acknowledged up to a sender's completions into the mean transfer size."""
        completed = after.transfers_completed_total - before.transfers_completed_total
        acked = after.acked_bytes_total - before.acked_bytes_total
        if completed < 0 or acked < 0:
            return  # the sender restarted: its totals went back
        pair.uncounted_bytes += acked
        pair.uncounted_transfers += completed
        if pair.uncounted_transfers == 0:
            return
        size = pair.uncounted_bytes / pair.uncounted_transfers
        completed = pair.uncounted_transfers
        pair.uncounted_bytes = pair.uncounted_transfers = 0
        if not pair.counting:
            pair.counting = True
            return
        if pair.mean_transfer_bytes == 0:
            pair.mean_transfer_bytes = size
        else:
            weight = 1.0 - (1.0 - self.config.transfer_size_gain) ** completed
            pair.mean_transfer_bytes += weight * (size - pair.mean_transfer_bytes)

    def _fold(self, pair: _Pair, now: float, limited_s: float) -> None:
        """Recombine the live senders' latest samples; ``limited_s``: the newest sample's limited time."""
        cfg = self.config
        live = [(s, at) for s, at in pair.senders.values() if now - at <= cfg.stale_after_s]
        pair.senders = {name: entry for name, entry in pair.senders.items() if now - entry[1] <= cfg.stale_after_s}
        goodput = acked_gbit = longest_busy_s = rtt = limited_gbit = longest_limited_s = 0.0
        delivering = 0  # senders that had bytes acknowledged in their interval
        in_flight = active = 0
        budget = 0.0
        for s, at in live:
            goodput += s.goodput_gbps
            acked = s.goodput_gbps * s.interval_s
            acked_gbit += acked
            if s.busy_goodput_gbps > 0:
                longest_busy_s = max(longest_busy_s, acked / s.busy_goodput_gbps)
                delivering += 1
            if s.limited_s > 0:
                limited_gbit += s.limited_goodput_gbps * s.limited_s
                longest_limited_s = max(longest_limited_s, s.limited_s)
            in_flight += s.bytes_in_flight
            active += s.active_transfers
            budget = max(budget, s.budget_gbps)
            if s.active_transfers or s.goodput_gbps > 0:
                rtt = max(rtt, s.rtt_s)
            if s.min_rtt_s > 0:
                _push_min(pair.base_rtts, at, s.min_rtt_s)
        while pair.base_rtts and pair.base_rtts[0][0] < now - cfg.base_rtt_window_s:
            pair.base_rtts.popleft()
        base = pair.base_rtts[0][1] if pair.base_rtts else rtt
        queue_delay = max(0.0, rtt - base) if rtt > 0 else 0.0
        # An unpaced pair's capacity: one sender's busy goodput is exact; for several, whose busy periods may
        # not overlap, their summed goodput (exact when the link was busy the whole interval).
        busy_goodput = acked_gbit / longest_busy_s if delivering == 1 else goodput
        weight = 1.0 if pair.updated_at is None else 1.0 - math.exp(-max(0.0, now - pair.updated_at) / cfg.smoothing_s)
        pair.goodput_gbps += weight * (goodput - pair.goodput_gbps)
        pair.updated_at = now
        pair.queue_delay_s, pair.rtt_s, pair.waiting = queue_delay, rtt, longest_limited_s > 0
        pair.bytes_in_flight, pair.active_transfers = in_flight, active
        pair.budget_gbps = budget
        pair.peak_gbps = max(pair.peak_gbps, busy_goodput)
        if limited_s > 0:
            pair.limited.append((now, limited_gbit / longest_limited_s, limited_s))
            pair.bottleneck_at = now
            while pair.limited[0][0] < now - cfg.bottleneck_window_s:
                pair.limited.popleft()
            pair.limited_gbps = _held_rate(pair.limited, cfg.min_limited_s)
            pair.proven_gbps = goodput
        else:  # a link that recovered carries the backlog at its budget: that proves it while the estimate holds
            pair.proven_gbps = max(pair.proven_gbps, goodput)

    def _capacity_of(self, key: tuple[str, str], pair: _Pair | None) -> float | None:
        if pair is not None and pair.budget_gbps > 0:
            return pair.budget_gbps
        configured = self._capacity.get(key, self._default_capacity)
        if configured is not None:
            return configured
        return pair.peak_gbps if pair is not None and pair.peak_gbps > 0 else None

    def view(self, src_site: str, dst_site: str, now: float) -> LinkView | None:
        """The pair's LinkView at ``now`` (None if neither telemetry nor a configured capacity is known)."""
        key = (src_site, dst_site)
        pair = self._pairs.get(key)
        capacity = self._capacity_of(key, pair)
        if capacity is None:
            return None
        if pair is None or pair.updated_at is None:
            return LinkView(src_site, dst_site, capacity, age_s=math.inf)
        cfg = self.config
        deliverable = None
        if pair.limited_gbps is not None:
            probing_s = now - pair.bottleneck_at - cfg.hold_s
            estimate = max(pair.limited_gbps, pair.proven_gbps)  # delivering more than the estimate proves more
            estimate *= math.exp(cfg.probe_per_s * probing_s) if probing_s > 0 else 1.0
            deliverable = estimate if estimate < capacity else None
        newest = max(at for _, at in pair.senders.values()) if pair.senders else pair.updated_at
        age = max(0.0, now - newest)
        if age > cfg.stale_after_s:
            return LinkView(
                src_site, dst_site, capacity, deliverable, mean_transfer_bytes=int(pair.mean_transfer_bytes), age_s=age
            )
        effective = max(min(deliverable or capacity, capacity), 1e-3)
        return LinkView(
            src_site=src_site,
            dst_site=dst_site,
            capacity_gbps=capacity,
            deliverable_gbps=deliverable,
            goodput_gbps=pair.goodput_gbps,
            utilization=pair.goodput_gbps / effective,
            rtt_s=pair.rtt_s,
            # RTT above base is queueing while KV waits on the link or it is read as slow; else late acks (a busy CPU).
            queue_delay_s=pair.queue_delay_s if pair.waiting or deliverable is not None else 0.0,
            bytes_in_flight=pair.bytes_in_flight,
            active_transfers=pair.active_transfers,
            mean_transfer_bytes=int(pair.mean_transfer_bytes),
            age_s=age,
        )

    def views(self, now: float) -> tuple[LinkView, ...]:
        """The LinkView of every pair heard from."""
        found = (self.view(src, dst, now) for src, dst in self._pairs)
        return tuple(v for v in found if v is not None)
