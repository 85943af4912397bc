"""A fluid model of one inter-site link shared by concurrent layer-wise KV transfers.

Each transfer (flow) produces its bytes at a steady rate while its prefill runs (layer by layer,
approximated as continuous) and can send only what has been produced. A flow that has caught up
with its prefill is capped at its production rate. How the rest of the capacity is shared:

- ``fair`` (what concurrent TCP transfers get): max-min fairly among the flows, every flow not
  capped takes an equal share of what is left.
- ``sender-fifo`` (a sender that sends its transfers one after another): max-min fairly among
  the senders (``Flow.owner``); a sender gives its share to its flows in the order they started,
  so a later transfer only gets what the earlier ones cannot use.

Rates change only at events (a flow starts, catches up, its prefill ends, it completes, or the
capacity changes), so the simulator asks :meth:`FluidLink.next_event_s` and calls
:meth:`FluidLink.advance` there.
"""

from __future__ import annotations

_EPS_BYTES = 1.0
_INF = float("inf")
SHARING = ("fair", "sender-fifo")


class Flow:
    """One request's KV transfer over the link."""

    __slots__ = ("key", "owner", "total_bytes", "sent_bytes", "start_s", "end_s", "production_bps", "rate_bps")

    def __init__(self, key: object, total_bytes: float, start_s: float, end_s: float, owner: str = "") -> None:
        self.key = key
        self.owner = owner  # the sending process (its counters are published as one LinkStats)
        self.total_bytes = float(total_bytes)
        self.sent_bytes = 0.0
        self.start_s = start_s
        self.end_s = end_s  # prefill end: everything is produced by then
        self.production_bps = self.total_bytes / max(end_s - start_s, 1e-9)  # bytes/s
        self.rate_bps = 0.0  # bytes/s currently granted

    def produced_bytes(self, now: float) -> float:
        """Bytes the prefill has produced by ``now``."""
        if now >= self.end_s:
            return self.total_bytes
        return self.production_bps * max(0.0, now - self.start_s)

    def caught_up(self, now: float) -> bool:
        """True while producing and everything produced has been sent."""
        return now < self.end_s and self.produced_bytes(now) - self.sent_bytes <= _EPS_BYTES


def _want(flows: list[Flow], now: float) -> float:
    """Bytes/s a group of flows can use: their production rates while all are caught up, else unlimited."""
    return sum(f.production_bps if f.caught_up(now) else _INF for f in flows)


def _hand_out(flows: list[Flow], bytes_per_s: float, now: float) -> None:
    """Give a group's rate to its flows in order: each takes what it can use of what is left."""
    for f in flows:
        f.rate_bps = min(f.production_bps if f.caught_up(now) else _INF, bytes_per_s)
        bytes_per_s -= f.rate_bps


class FluidLink:
    """Max-min fair sharing of a (time-varying) capacity among layer-wise flows, or among their senders."""

    def __init__(
        self, capacity_gbps: float, schedule: tuple[tuple[float, float], ...] = (), sharing: str = "fair"
    ) -> None:
        if sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {sharing!r}")
        self.capacity_gbps = capacity_gbps
        self.sharing = sharing
        self._schedule = sorted(schedule)  # (time_s, new capacity_gbps)
        self._next_change = 0
        self.flows: list[Flow] = []
        self.now = 0.0
        self.busy_bit_s = 0.0  # integral of the sending rate (bits)
        self.capacity_bit_s = 0.0  # integral of the capacity (bits)
        self.overload_s = 0.0  # time spent with demand above capacity (produced bytes queueing)
        self.delivered_bytes: dict[str, float] = {}  # per owner, since time zero
        self.busy_s: dict[str, float] = {}  # per owner: time with at least one of its flows on the link
        self.completed: dict[str, int] = {}  # per owner: flows delivered in full

    @property
    def capacity_bps(self) -> float:
        """Current capacity in bytes/s."""
        return self.capacity_gbps * 1e9 / 8

    def utilization(self) -> float:
        """Fraction of the current capacity in use."""
        return sum(f.rate_bps for f in self.flows) / max(self.capacity_bps, 1e-9)

    def backlog_bytes(self, now: float) -> float:
        """Bytes produced but not yet sent, over all flows."""
        return sum(f.produced_bytes(now) - f.sent_bytes for f in self.flows)

    def add(self, flow: Flow, now: float) -> list[Flow]:
        """Start a flow; returns flows completed while advancing to ``now``."""
        done = self.advance(now)
        self.flows.append(flow)
        self._reallocate(now)
        return done

    def advance(self, now: float) -> list[Flow]:
        """Move to ``now`` (applying capacity changes on the way); returns the flows that completed."""
        done: list[Flow] = []
        while self._next_change < len(self._schedule) and self._schedule[self._next_change][0] <= now:
            at, gbps = self._schedule[self._next_change]
            done += self._progress(max(at, self.now))
            self.capacity_gbps = gbps
            self._next_change += 1
            self._reallocate(self.now)
        done += self._progress(now)
        if done or self.flows:
            self._reallocate(now)
        return done

    def _progress(self, now: float) -> list[Flow]:
        dt = now - self.now
        if dt <= 0:
            return []
        overloaded = bool(self.flows) and self.backlog_bytes(self.now + dt / 2) > 1e6
        sending = 0.0
        delivered, busy = self.delivered_bytes, self.busy_s
        owners = set()
        for f in self.flows:
            step = min(f.total_bytes - f.sent_bytes, f.rate_bps * dt)
            f.sent_bytes += step
            sending += f.rate_bps
            delivered[f.owner] = delivered.get(f.owner, 0.0) + step
            owners.add(f.owner)
        for owner in owners:
            busy[owner] = busy.get(owner, 0.0) + dt
        self.busy_bit_s += sending * 8 * dt
        self.capacity_bit_s += self.capacity_bps * 8 * dt
        if overloaded and sending >= 0.999 * self.capacity_bps:
            self.overload_s += dt
        self.now = now
        done = [f for f in self.flows if f.total_bytes - f.sent_bytes <= _EPS_BYTES]
        if done:
            self.flows = [f for f in self.flows if f.total_bytes - f.sent_bytes > _EPS_BYTES]
            for f in done:
                self.completed[f.owner] = self.completed.get(f.owner, 0) + 1
        return done

    def _reallocate(self, now: float) -> None:
        """Water-filling: caught-up flows want their production rate, the others want all they can get."""
        if self.sharing == "fair":
            groups = [[f] for f in self.flows]
        else:
            by_owner: dict[str, list[Flow]] = {}
            for f in sorted(self.flows, key=lambda f: f.start_s):
                by_owner.setdefault(f.owner, []).append(f)
            groups = list(by_owner.values())
        wanted = sorted(((_want(group, now), group) for group in groups), key=lambda item: item[0])
        remaining = self.capacity_bps
        for i, (want, group) in enumerate(wanted):
            share = remaining / (len(wanted) - i)
            if want <= share:
                _hand_out(group, want, now)
                remaining -= want
            else:
                for _, rest in wanted[i:]:
                    _hand_out(rest, share, now)
                break

    def next_event_s(self) -> float:
        """When rates next change: a completion, a catch-up, a prefill end or a capacity change."""
        t = self._schedule[self._next_change][0] if self._next_change < len(self._schedule) else _INF
        now = self.now
        for f in self.flows:
            if f.end_s > now:
                t = min(t, f.end_s)
                behind = f.produced_bytes(now) - f.sent_bytes
                if behind > _EPS_BYTES and f.rate_bps > f.production_bps:
                    t = min(t, now + behind / (f.rate_bps - f.production_bps))
            elif f.rate_bps > 0:
                t = min(t, now + (f.total_bytes - f.sent_bytes) / f.rate_bps)
        return t
