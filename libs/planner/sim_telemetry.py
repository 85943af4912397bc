"""LinkStats as the simulated senders publish them, with the semantics of ``libs/kvwire/linkstats.py``.

Each sending process (one per PrfaaS prefill instance, plus the PrfaaS cache pool that ships
prefixes) publishes every ``interval_s``, at its own phase, a sample of its own flows on the fluid
link: goodput = bytes delivered in the interval / interval; busy goodput = the same bytes / the time
it had a transfer on the link (a transfer starts with its prefill, as a layer-wise send does);
utilisation = goodput / budget; bytes in flight = per transfer, what is produced and not yet
acknowledged, capped by the sender's window (``window_bytes``; the rest waits in the sender and is
not visible); RTT = base RTT, or in-flight bytes / sending rate when the window holds a queue
(Little's law), plus ``ack_delay_s`` (a busy CPU acking late; the interval's least RTT stays the
path's); limited time = the time one of its transfers had produced bytes waiting while the link ran
below the pacing budget (KV waiting on the link, not on the prefill or the pacer), and the bytes it
delivered meanwhile (:class:`MeteredLink` counts them). The router receives each sample ``lag_s``
after it was taken.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from libs.common.errors import ConfigError
from libs.common.messages import LinkStats
from libs.planner.link import Flow, FluidLink
from libs.policy import TelemetryConfig


@dataclass(frozen=True)
class TelemetrySettings:
    """How the simulated senders publish LinkStats, and how the simulated router reads them."""

    interval_s: float = 1.0  # publish period of every sender (kvwire: LinkConfig.publish_interval_s)
    lag_s: float = 0.25  # from the end of a sample's interval to the router using it
    window_bytes: int = 64 << 20  # unacknowledged bytes per transfer (kvwire TCP: window_bytes)
    budget_gbps: float | None = None  # the pair's pacing budget (None: the planned link bandwidth)
    router: TelemetryConfig = field(default_factory=TelemetryConfig)
    ack_delay_s: float = 0.0  # CPU delay added to every ack's round trip (a loaded sender or receiver host)

    def __post_init__(self) -> None:
        checks = {
            "interval_s": self.interval_s > 0,
            "lag_s": self.lag_s >= 0,
            "window_bytes": self.window_bytes > 0,
            "budget_gbps": self.budget_gbps is None or self.budget_gbps > 0,
            "ack_delay_s": self.ack_delay_s >= 0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"telemetry {key} must be positive, got {getattr(self, key)!r}")

    def to_json(self) -> dict:
        """The settings, for a scenario's JSON."""
        return asdict(self)


_WAITING_BYTES = 1.0  # produced and not sent: less is rounding (as in libs.planner.link)


class MeteredLink(FluidLink):
    """A fluid link that also counts, per sender, the time KV waited on it below the pacing budget and the bytes meanwhile."""

    def __init__(
        self,
        capacity_gbps: float,
        budget_gbps: float,
        schedule: tuple[tuple[float, float], ...] = (),
        sharing: str = "fair",
    ) -> None:
        super().__init__(capacity_gbps, schedule, sharing)
        self.budget_gbps = budget_gbps
        self.limited_s: dict[str, float] = {}  # per owner, since time zero
        self.limited_bytes: dict[str, float] = {}

    def _progress(self, now: float) -> list[Flow]:
        dt = now - self.now
        if dt > 0 and self.capacity_gbps < self.budget_gbps:  # rates are constant until ``now``
            mid = self.now + dt / 2
            waiting = {
                f.owner
                for f in self.flows
                if f.produced_bytes(mid) - f.sent_bytes - f.rate_bps * dt / 2 > _WAITING_BYTES
            }
            for owner in waiting:
                self.limited_s[owner] = self.limited_s.get(owner, 0.0) + dt
                step = sum(min(f.total_bytes - f.sent_bytes, f.rate_bps * dt) for f in self.flows if f.owner == owner)
                self.limited_bytes[owner] = self.limited_bytes.get(owner, 0.0) + step
        return super()._progress(now)


class _SenderState:
    __slots__ = ("delivered", "busy_s", "limited_s", "limited_bytes", "at", "srtt_s", "rtt_s")

    def __init__(self) -> None:
        self.delivered = 0.0
        self.busy_s = 0.0
        self.limited_s = 0.0
        self.limited_bytes = 0.0
        self.at = 0.0
        self.srtt_s = 0.0
        self.rtt_s = 0.0


class LinkSampler:
    """Takes the LinkStats of one sender from the metered fluid link (counters since its previous sample)."""

    def __init__(
        self,
        link: MeteredLink,
        src_site: str,
        dst_site: str,
        base_rtt_s: float,
        window_bytes: int,
        ack_delay_s: float = 0.0,
    ) -> None:
        self.link = link
        self.src_site, self.dst_site = src_site, dst_site
        self.budget_gbps = link.budget_gbps
        self.base_rtt_s = base_rtt_s
        self.window_bytes = window_bytes
        self.ack_delay_s = ack_delay_s
        self._senders: dict[str, _SenderState] = {}

    def sample(self, sender: str, now: float) -> LinkStats:
        """``sender``'s statistics over (its previous sample, ``now``]; the link must be advanced to ``now``."""
        state = self._senders.get(sender)
        if state is None:
            state = self._senders[sender] = _SenderState()
        link = self.link
        delivered = link.delivered_bytes.get(sender, 0.0)
        busy_s = link.busy_s.get(sender, 0.0)
        limited_s, limited_bytes = link.limited_s.get(sender, 0.0), link.limited_bytes.get(sender, 0.0)
        interval_s = max(now - state.at, 1e-9)
        bits = (delivered - state.delivered) * 8
        busy = busy_s - state.busy_s
        limited = limited_s - state.limited_s
        in_flight = sending = 0.0
        active = 0
        for f in link.flows:
            if f.owner == sender:
                active += 1
                if f.rate_bps > 0:  # a transfer waiting for its turn has nothing on the wire
                    sending += f.rate_bps
                    unacked = f.produced_bytes(now) - f.sent_bytes + f.rate_bps * self.base_rtt_s
                    in_flight += min(self.window_bytes, unacked)
        rtt = max(self.base_rtt_s, in_flight / sending) if sending > 0 else 0.0
        min_rtt = 0.0
        if bits > 0:  # acks arrived in the interval: RTT samples between the interval's start and now
            seen = [r for r in (state.rtt_s, rtt) if r > 0] or [self.base_rtt_s]
            min_rtt = min(seen)
            state.srtt_s = seen[-1]  # the smoothed RTT follows the latest acks
        state.rtt_s = rtt
        goodput = bits / interval_s / 1e9
        stats = LinkStats(
            src_site=self.src_site,
            dst_site=self.dst_site,
            ts=now,
            interval_s=interval_s,
            budget_gbps=self.budget_gbps,
            goodput_gbps=goodput,
            busy_goodput_gbps=bits / busy / 1e9 if busy > 0 else 0.0,
            utilization=goodput / self.budget_gbps,
            rtt_s=state.srtt_s + self.ack_delay_s if state.srtt_s else 0.0,
            min_rtt_s=min_rtt,
            bytes_in_flight=int(in_flight),
            active_transfers=active,
            acked_bytes_total=int(delivered),
            retransmitted_bytes_total=0,
            retransmitted_chunks_total=0,
            transfers_completed_total=link.completed.get(sender, 0),
            transfers_failed_total=0,
            sender=sender,
            limited_s=limited,
            limited_goodput_gbps=(limited_bytes - state.limited_bytes) * 8 / limited / 1e9 if limited > 0 else 0.0,
        )
        state.delivered, state.busy_s, state.at = delivered, busy_s, now
        state.limited_s, state.limited_bytes = limited_s, limited_bytes
        return stats
