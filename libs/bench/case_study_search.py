"""One deployment's sustainable throughput: rate steps through the router, and the search over them.

A *step* offers Poisson arrivals at one rate (paper req/s; the warm-up and the window each hold exactly
their expected count, ``poisson_times``) for a warm-up and then a steady window,
starting from an idle lab (every instance's heartbeat shows an empty queue). Over the window it
counts arrivals A, first tokens F and completions C. A request gets its first token once its
prefill is done and it holds a decode slot (the router reserves the slot before the prefill, so a
full decode pool shows as refused requests, not as late completions); F follows the arrivals by a
TTFT (seconds), C by a whole decode (~25 s), so F judges a window with far less noise. The rate
*keeps up* when F >= 95% of A and the requests waiting for their first token do not pile up: a
line fitted to their count across the window rises by at most 5% of A. After the window the step
waits (for the TTFT steps) until the window's requests have their first token, then closes what is
still open, so the next step starts from an idle lab again.

The *search* starts at the planner's Lambda_max: up by 10% while a rate keeps up; after a rate that
does not, down to the lower of 95% of it and what it served (F over the window: the capacity, when
overloaded); once a kept-up rate is below a failed one, bisect. Each probe is one step; the
throughput is the highest rate that kept up.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np
from nats.aio.client import Client as NatsClient

from libs.bench.case_study_deploy import PD_SITE, RunningLab, Scales, cpu_seconds
from libs.bench.case_study_load import Driver, Sent, poisson_times, stratified_lengths
from libs.common import subjects
from libs.common.errors import UpstreamTimeout
from libs.common.messages import InstanceLoad, OutcomeEvent, instance_load_decoder

DECISION_METRIC = "prfaas_router_decision_seconds"  # router arrival to the first decision (prepare + decide)
KEEP_UP = 0.95  # first tokens over the window at least this share of arrivals
GROWTH = 0.05  # in-flight requests grew by at most this share of the window's arrivals
UP, DOWN = 1.10, 0.95  # the search's steps before it has a bracket
_IDLE_TIMEOUT_S = 60.0
_GROWTH_POINTS = 21  # in-flight counts the growth line is fitted to
_OUTCOME_WAIT_S = 5.0  # an outcome leaves the router within ~1 s of its response (settle), published with the next


class Watch:
    """What the harness reads from the lab's bus: outcome events by request id and each instance's latest heartbeat."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self.outcomes: dict[str, OutcomeEvent] = {}
        self.loads: dict[str, InstanceLoad] = {}
        self._changed = asyncio.Event()

    async def start(self) -> None:
        """Subscribe to the router site's outcomes and every heartbeat."""
        await self.nc.subscribe(subjects.outcomes(PD_SITE), cb=self._outcome)
        await self.nc.subscribe(subjects.LOAD_ALL, cb=self._load)

    async def _outcome(self, msg) -> None:
        event = msgspec.json.decode(msg.data, type=OutcomeEvent)
        self.outcomes[event.request_id] = event
        self._changed.set()

    async def _load(self, msg) -> None:
        load = instance_load_decoder.decode(msg.data)
        self.loads[load.instance] = load
        self._changed.set()

    async def until(self, condition, timeout_s: float, what: str) -> None:
        """Wait until ``condition()`` holds (checked at each event), or UpstreamTimeout naming ``what``."""
        try:
            async with asyncio.timeout(timeout_s):
                while not condition():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise UpstreamTimeout(f"the lab did not reach {what} within {timeout_s:g} s") from None

    async def until_idle(self, instances: int) -> None:
        """Every instance heartbeats an empty queue, in a heartbeat sent after this call."""
        since = time.time()

        def idle() -> bool:
            fresh = [ld for ld in self.loads.values() if ld.ts >= since]
            return len(fresh) >= instances and all(ld.queue_depth == 0 for ld in fresh)

        await self.until(idle, _IDLE_TIMEOUT_S, "idle instances")

    async def outcomes_of(self, records: list[Sent]) -> None:
        """Wait (briefly) for the outcome events of ``records``."""
        ids = {r.request_id for r in records if r.request_id}
        try:
            await self.until(lambda: ids <= self.outcomes.keys(), _OUTCOME_WAIT_S, "every outcome event")
        except UpstreamTimeout:
            pass  # figures use the outcomes that arrived


@dataclass(frozen=True)
class StepPlan:
    """One step: its rate and durations in paper units, its seed, and whether its TTFTs are wanted."""

    kind: str  # "light", "probe" or "load90"
    rate_rps: float
    warmup_s: float
    window_s: float
    seed: int
    ttft: bool = False


@dataclass
class Step:
    """What one step measured (paper units: req/s, s)."""

    plan: StepPlan
    arrivals: int = 0  # requests sent in the window
    first_tokens: int = 0  # first tokens in the window (prefill done, decode slot held)
    completions: int = 0  # last tokens in the window
    failures: int = 0  # the window's requests that failed (refused: no capacity)
    waiting_growth: float = 0.0  # rise over the window of the requests waiting for their first token
    offered_rps: float = 0.0
    served_rps: float = 0.0  # first tokens per paper second
    completed_rps: float = 0.0
    kept_up: bool = False
    ttfts_s: list[float] = field(default_factory=list)
    records: list[Sent] = field(default_factory=list)
    outcomes: list[OutcomeEvent] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    router_decision_ms: float | None = None  # the router's mean prepare + decide over the step (live ms)


@dataclass
class StepContext:
    """What every step of one deployment uses."""

    lab: RunningLab
    driver: Driver
    watch: Watch
    scales: Scales
    instances: int  # instances that heartbeat
    max_prompt_tokens: int  # the model's context less the completion: a longer prompt is refused (400)


async def run_step(ctx: StepContext, plan: StepPlan) -> Step:
    """Run one step from an idle lab and measure it."""
    await ctx.watch.until_idle(ctx.instances)
    sc = ctx.scales
    rng = np.random.default_rng(plan.seed)
    warm, window = sc.live_s(plan.warmup_s), sc.live_s(plan.window_s)
    times = poisson_times(sc.live_rps(plan.rate_rps), (warm, window), rng)
    lengths = np.minimum(stratified_lengths(len(times), rng), ctx.max_prompt_tokens)
    cpu0 = _cpu(ctx)
    decisions0 = await ctx.driver.router_metric(DECISION_METRIC)
    start = time.monotonic()
    records = await ctx.driver.offer(lengths, times, start)
    await asyncio.sleep(max(0.0, start + warm + window - time.monotonic()))
    w0, w1 = start + warm, start + warm + window
    step = Step(plan, records=records)
    in_window = [r for r in records if w0 <= r.sent_at < w1]
    if plan.ttft:
        await ctx.driver.first_tokens(in_window, deadline_s=sc.live_s(120.0))
    await ctx.driver.cancel_all()
    step.wall_s = time.monotonic() - start
    step.cpu_s = {name: after - cpu0.get(name, 0.0) for name, after in _cpu(ctx).items()}
    decisions1 = await ctx.driver.router_metric(DECISION_METRIC)
    if decisions1[1] > decisions0[1]:
        step.router_decision_ms = 1e3 * (decisions1[0] - decisions0[0]) / (decisions1[1] - decisions0[1])
    await ctx.watch.outcomes_of(in_window)
    _measure(step, in_window, w0, w1, sc)
    step.outcomes = [ctx.watch.outcomes[r.request_id] for r in in_window if r.request_id in ctx.watch.outcomes]
    return step


def _measure(step: Step, in_window: list[Sent], w0: float, w1: float, sc: Scales) -> None:
    """Counts over the window [w0, w1) (monotonic times), rates and TTFTs in paper units, and the verdict."""
    records = step.records
    step.arrivals = len(in_window)
    step.first_tokens = sum(r.first_at is not None and w0 <= r.first_at < w1 for r in records)
    step.completions = sum(r.status == "ok" and r.done_at is not None and w0 <= r.done_at < w1 for r in records)
    step.failures = sum(r.status == "error" for r in in_window)
    window_paper = sc.paper_s(w1 - w0)
    step.offered_rps = step.arrivals / window_paper
    step.served_rps = step.first_tokens / window_paper
    step.completed_rps = step.completions / window_paper
    step.waiting_growth = waiting_growth(records, w0, w1)
    served = step.first_tokens >= KEEP_UP * step.arrivals
    bounded = step.waiting_growth <= GROWTH * max(1, step.arrivals)
    step.kept_up = served and bounded
    step.ttfts_s = [sc.paper_s(r.ttft_s) for r in in_window if r.ttft_s is not None]


def waiting(records: list[Sent], at: float) -> int:
    """Requests sent by ``at`` that had neither their first token nor their end by then."""
    return sum(
        r.sent_at <= at and (r.first_at is None or r.first_at > at) and (r.done_at is None or r.done_at > at)
        for r in records
    )


def waiting_growth(records: list[Sent], w0: float, w1: float, points: int = _GROWTH_POINTS) -> float:
    """How much the count of requests waiting for their first token grew over [w0, w1]: a fitted line's rise."""
    at = np.linspace(w0, w1, points)
    counts = [waiting(records, float(t)) for t in at]
    slope = np.polyfit(at - w0, counts, 1)[0]
    return float(slope * (w1 - w0))


def _cpu(ctx: StepContext) -> dict[str, float]:
    out = {name: cpu_seconds(pid) for name, pid in ctx.lab.pids.items()}
    out["bench"] = time.process_time()
    return out


@dataclass(frozen=True)
class SearchPlan:
    """How a deployment's throughput is searched (paper units)."""

    first_rps: float
    probes: int
    warmup_s: float
    window_s: float
    seed: int


def next_rate(kept: list[float], failed: list[Step]) -> float:
    """The next probe's rate from the rates that kept up and the steps that did not."""
    lo = max(kept, default=None)
    hi = min(failed, key=lambda s: s.plan.rate_rps, default=None)
    if hi is None:
        return lo * UP
    if lo is None:
        return min(DOWN * hi.plan.rate_rps, hi.served_rps) if hi.served_rps > 0 else DOWN * hi.plan.rate_rps
    return (lo + hi.plan.rate_rps) / 2


async def search(
    ctx: StepContext, plan: SearchPlan, on_step: Callable[[Step], None] = lambda step: None
) -> tuple[float | None, list[Step]]:
    """The highest probed rate that kept up (None if none did) and every probe, in order (each also to ``on_step``)."""
    steps: list[Step] = []
    rate = plan.first_rps
    for i in range(plan.probes):
        step = await run_step(ctx, StepPlan("probe", rate, plan.warmup_s, plan.window_s, plan.seed + i))
        on_step(step)
        steps.append(step)
        kept = [s.plan.rate_rps for s in steps if s.kept_up]
        rate = next_rate(kept, [s for s in steps if not s.kept_up])
        if not math.isfinite(rate) or rate <= 0:
            break
    kept = [s.plan.rate_rps for s in steps if s.kept_up]
    return max(kept, default=None), steps
