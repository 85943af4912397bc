"""One direction between two sites as a sending process holds it: its budget and pacing bucket (``Link``), and the
settings of every link of a process (``LinkConfig``). A leaf: telemetry (``linkstats``) and budget sharing
(``sharing``) both build on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from libs.common.errors import ConfigError
from libs.common.messages import LinkStats
from libs.kvwire.pacing import TokenBucket

if TYPE_CHECKING:
    from libs.kvwire.linkstats import LinkCounters


@dataclass(frozen=True)
class LinkConfig:
    """Bandwidth budgets per destination site (Gbps, 0 = unpaced), pacing, telemetry and sharing periods."""

    budgets_gbps: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    default_budget_gbps: float = 0.0
    # Bucket depth in seconds of budget: enough to absorb a sender's scheduling hiccups (a thread a
    # few ms late keeps its tokens), small enough that no one-second window carries more than ~2%
    # over the budget.
    burst_s: float = 0.02
    min_burst_bytes: int = 256 << 10
    publish_interval_s: float = 1.0
    rtt_gain: float = 0.125  # EWMA gain of the smoothed RTT (as TCP's SRTT)
    share_site: bool = True  # with a NATS client: share each paced pair's budget with the site's processes
    share_interval_s: float = 0.15  # announcement period
    share_hold_intervals: float = 2.0  # silent listening at start before letting anything out
    share_lease_intervals: float = 4.0  # a bucket pauses this long after sending its last confirmed announcement
    share_expire_intervals: float = 6.0  # a peer silent this long is forgotten (must exceed the lease)

    def __post_init__(self) -> None:
        for key, value in (
            ("default_budget_gbps", self.default_budget_gbps),
            *((f"budgets_gbps[{site}]", gbps) for site, gbps in self.budgets_gbps.items()),
        ):
            if not 0 <= value < math.inf:
                raise ConfigError(f"{key} must be a finite number >= 0, got {value}")
        for key in ("burst_s", "publish_interval_s", "share_interval_s", "share_hold_intervals"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if not 0 < self.share_lease_intervals < self.share_expire_intervals:
            raise ConfigError(
                f"share_lease_intervals must be > 0 and below share_expire_intervals "
                f"({self.share_expire_intervals}), got {self.share_lease_intervals}"
            )

    def budget_gbps(self, dst_site: str) -> float:
        """Budget towards ``dst_site``."""
        return self.budgets_gbps.get(dst_site, self.default_budget_gbps)


class Link:
    """One direction between two sites: its budget, pacing bucket and counters."""

    def __init__(
        self, src_site: str, dst_site: str, budget_gbps: float, bucket: TokenBucket, counters: LinkCounters
    ) -> None:
        self.src_site = src_site
        self.dst_site = dst_site
        self.budget_gbps = budget_gbps  # the pair's (0: unpaced); the bucket's rate is this process's share
        self.bucket = bucket
        self.counters = counters
        self.on_activity: Callable[[], None] | None = None  # the first transfer started or the last ended
        self._orders: dict[str, int] = {}  # transfer id -> its place in the pacing order (oldest first)
        self._next_order = 0

    def transfer_started(self, transfer_id: str) -> None:
        """A transfer began using the link (on the event loop); it is paced after every older one."""
        self._next_order += 1
        self._orders[transfer_id] = self._next_order
        if self.counters.transfer_started() == 1 and self.on_activity is not None:
            self.on_activity()

    def transfer_ended(self, transfer_id: str, ok: bool) -> None:
        """A transfer stopped using the link (on the event loop)."""
        self._orders.pop(transfer_id, None)
        if self.counters.transfer_ended(ok) == 0 and self.on_activity is not None:
            self.on_activity()

    def order_of(self, transfer_id: str) -> int:
        """The transfer's pacing order (lower goes first; any thread)."""
        return self._orders.get(transfer_id, self._next_order + 1)

    def stats(self, sender: str = "") -> LinkStats:
        """Take a snapshot (resets the interval figures)."""
        return self.counters.snapshot(self.src_site, self.dst_site, self.budget_gbps, sender)
