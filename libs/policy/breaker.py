"""Per site pair: stop routing across a link that fails or falls silent, and let it back in through one probe.

A router keeps one :class:`LinkBreakers` for the pairs into its decode site. A pair's breaker opens
(its PrfaaS site leaves the view, and decisions say why) when:

- ``failures`` remote attempts failed on the link (a transfer failed, the prefill job went
  unanswered) within ``window_s``, with no attempt's KV arriving after them; a refusal or a
  decode-side failure says nothing about the link;
- nothing was heard from the site (heartbeats and LinkStats both cross the NATS gateway) for more
  than ``silence_s`` while other sites were heard: a router whose own loop or connection stalled
  hears nobody and blames no one.

It stays open for a hold (``hold_s``, doubled per trip without a success between, at most
``max_hold_s``) and until the site has been heard without a silence for ``recover_s``. Then it is
half-open: the next remote attempt is the probe and the others stay local while it runs. The probe's
KV arriving closes the breaker; the link failing it opens it again; any other end (a refusal, the
decode side, a client gone) frees the probe for the next request. Attempts placed before the breaker
last changed say nothing about the link since: their verdicts are ignored.

The KV path of a pair is down while its breaker is open, or once ``failures`` remote attempts failed
on the link with none crossing since (a half-open breaker no request probes says nothing new):
``path_down``, what the router's readiness and its ``kv_path_up`` gauge read.

Pure: the caller passes every time (the router its wall clock, the simulator its own).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields

from libs.common.errors import ConfigError

CLOSED, HALF_OPEN, OPEN = "closed", "half-open", "open"
LEVELS = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the metric's value per state


@dataclass(frozen=True)
class BreakerConfig:
    """When a pair's breaker opens, and how it comes back."""

    failures: int = 2  # link failures that open it ...
    window_s: float = 10.0  # ... within this long, with no success after them
    silence_s: float = 1.25  # nothing heard from the site this long while others are heard (heartbeats: 0.5 s)
    hold_s: float = 2.0  # the least time open before a probe; doubled per trip without a success between ...
    max_hold_s: float = 30.0  # ... up to this
    recover_s: float = 1.0  # the site heard without a silence this long before a probe

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            least = 0.0 if f.name == "recover_s" else 1e-9
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= least):
                raise ConfigError(f"breaker {f.name} must be a {'non-negative' if least == 0 else 'positive'} number")
        if self.max_hold_s < self.hold_s:
            raise ConfigError(f"breaker max_hold_s ({self.max_hold_s}) must be at least hold_s ({self.hold_s})")


@dataclass(frozen=True, slots=True)
class LinkState:
    """One pair's breaker at one moment: its state, since when, why, and whether a remote attempt may use it now."""

    src_site: str
    dst_site: str
    state: str
    since: float
    why: str = ""
    admits: bool = True

    def note(self) -> str:
        """``link dc-a->dc-b open since 12:03:04 (2 transfers failed in 2.0s: ...)`` (UTC), as decisions say it."""
        clock = time.strftime("%H:%M:%S", time.gmtime(self.since))
        return f"link {self.src_site}->{self.dst_site} {self.state} since {clock} ({self.why})"


class _Pair:
    """What one pair's breaker knows."""

    __slots__ = (
        "last_heard",
        "heard_since",
        "failures",
        "tripped_at",
        "why",
        "trips",
        "probing",
        "closed_at",
        "failed_since_ok",
        "last_failure",
    )

    def __init__(self) -> None:
        self.last_heard: float | None = None
        self.heard_since: float | None = None  # heard without a silence since
        self.failures: list[float] = []  # link failures since the last success, in the window
        self.tripped_at: float | None = None  # None: closed
        self.why = ""
        self.trips = 0  # since the last close
        self.probing = False
        self.closed_at = -math.inf
        self.failed_since_ok = 0  # link failures since an attempt's KV last crossed (none ignored)
        self.last_failure = ""


class LinkBreakers:
    """The breakers of the pairs from every PrfaaS site into ``dst_site``."""

    def __init__(self, dst_site: str, config: BreakerConfig | None = None) -> None:
        self.dst_site = dst_site
        self.config = config or BreakerConfig()
        self._pairs: dict[str, _Pair] = {}
        self._latest = -math.inf  # the latest message heard from any site

    def heard(self, site: str, now: float) -> None:
        """A message from ``site`` arrived (a heartbeat, or LinkStats of its pair into ``dst_site``)."""
        if site != self.dst_site:
            pair = self._pairs.setdefault(site, _Pair())
            last = pair.last_heard
            if last is not None and self._latest - last > self.config.silence_s:  # a silence just ended
                self._trip(pair, last + self.config.silence_s, f"nothing heard from {site} for {now - last:.1f}s")
                pair.heard_since = now
            if pair.heard_since is None:
                pair.heard_since = now
            pair.last_heard = now
        self._latest = max(self._latest, now)

    def state(self, site: str, now: float) -> LinkState:
        """The breaker of ``site``'s pair at ``now``."""
        pair = self._pairs.get(site)
        if pair is None:
            return LinkState(site, self.dst_site, CLOSED, -math.inf)
        cfg = self.config
        if pair.last_heard is not None and self._latest - pair.last_heard > cfg.silence_s:
            silent_s = self._latest - pair.last_heard
            why = f"nothing heard from {site} for {silent_s:.1f}s"
            return LinkState(site, self.dst_site, OPEN, pair.last_heard + cfg.silence_s, why, admits=False)
        if pair.tripped_at is None:
            return LinkState(site, self.dst_site, CLOSED, pair.closed_at)
        hold_end = pair.tripped_at + min(cfg.max_hold_s, cfg.hold_s * 2 ** (pair.trips - 1))
        heard_since = pair.heard_since if pair.heard_since is not None else math.inf
        if now < hold_end or now - heard_since < cfg.recover_s:
            return LinkState(site, self.dst_site, OPEN, pair.tripped_at, pair.why, admits=False)
        why = "a probe request is in flight" if pair.probing else f"one request may probe it; {pair.why}"
        since = max(hold_end, heard_since + cfg.recover_s)
        return LinkState(site, self.dst_site, HALF_OPEN, since, why, admits=not pair.probing)

    def states(self, now: float) -> list[LinkState]:
        """The breaker of every pair heard from."""
        return [self.state(site, now) for site in self._pairs]

    def path_down(self, site: str, now: float) -> str:
        """Why no KV transfer from ``site`` can succeed now ("" while its path is up)."""
        state = self.state(site, now)
        if state.state == OPEN:
            return f"breaker open: {state.why}"
        pair = self._pairs.get(site)
        if pair is not None and pair.failed_since_ok >= self.config.failures:
            return f"{pair.failed_since_ok} transfers failed and none crossed since: {pair.last_failure}"
        return ""

    def attempt_started(self, site: str, now: float) -> bool:
        """A remote attempt was placed over ``site``'s pair; True when it is the half-open link's probe."""
        pair = self._pairs.get(site)
        state = self.state(site, now)
        if pair is None or state.state != HALF_OPEN or not state.admits:
            return False
        pair.probing = True
        return True

    def attempt_ended(
        self, site: str, now: float, started_at: float, *, probe: bool, ok: bool | None, why: str = ""
    ) -> None:
        """A remote attempt placed at ``started_at`` ended: its KV crossed (True), the link failed it (False), or neither."""
        pair = self._pairs.get(site)
        if pair is None:
            return
        if probe:
            pair.probing = False
        if ok is not None:
            pair.failed_since_ok = 0 if ok else pair.failed_since_ok + 1
            pair.last_failure = why if not ok else pair.last_failure
        changed_at = pair.closed_at if pair.tripped_at is None else pair.tripped_at
        if ok is None or not (probe or started_at >= changed_at):
            return
        if ok:
            pair.tripped_at, pair.trips, pair.failures, pair.closed_at = None, 0, [], now
        elif pair.tripped_at is not None:
            self._trip(pair, now, f"probe failed: {why}" if probe else why)
        else:
            pair.failures = [t for t in pair.failures if t > now - self.config.window_s] + [now]
            if len(pair.failures) >= self.config.failures:
                span_s = now - pair.failures[0]
                self._trip(pair, now, f"{len(pair.failures)} transfers failed in {span_s:.1f}s: {why}")

    def _trip(self, pair: _Pair, at: float, why: str) -> None:
        """Open ``pair`` at ``at`` (a trip while not closed since the last one doubles the hold)."""
        pair.trips = pair.trips + 1 if pair.tripped_at is not None else 1
        pair.tripped_at = at if pair.tripped_at is None else max(pair.tripped_at, at)
        pair.why = why
