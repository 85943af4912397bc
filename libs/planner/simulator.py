"""Discrete-event simulator of a PrfaaS-PD deployment, routed by the same libs/policy code as the router.

Requests arrive (Poisson, or a given trace), the policy places each one from a ClusterView built
from the simulated state, prefill instances serve FIFO, remote KV streams layer-wise over a fluid
link (:mod:`libs.planner.link`) shared by concurrent transfers, and decode instances batch
continuously up to the profile's max batch (:mod:`libs.planner.sim_cluster`). Local KV moves
inside the PD site at ``intra_dc_gbps`` without contention.

The policy sees the link only as a live router does: the LinkStats each sending process publishes
(:mod:`libs.planner.sim_telemetry`), delivered after a lag and combined by
:class:`libs.policy.LinkTelemetry`; the slow timescale re-plans from that view too.

Connection setup and TCP slow start are not charged. A transfer on a cold pair (kvwire's pooled
connections closed after ``pool_idle_s`` unused) pays a handshake and slow-start rounds, but it
streams while its prefill runs, and on this path (``link_rtt_s``) new connections deliver all of a
case-study prompt's KV before its prefill ends, at 100 Gbps and at 10: the first token comes as on
warm connections. ``tests/planner/test_cold_link.py`` pins that argument to these defaults and shows
where it ends (a 40 ms path; a shipped prefix, sent whole, arrives up to ~50 ms later when cold).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from libs.engine.profiles import HardwareProfile, ModelProfile
from libs.planner.link import Flow
from libs.planner.replan import SlowTimescale
from libs.planner.search import PlanInputs
from libs.planner.sim_cluster import DecodeServer, PrefillServer, SimRequest
from libs.planner.sim_telemetry import LinkSampler, MeteredLink, TelemetrySettings
from libs.planner.workloads import Workload
from libs.policy import ClusterView, LinkTelemetry, LinkView, PolicyConfig, RouteRequest, make_policy

PRFAAS_SITE = "prfaas"
PD_SITE = "pd"
CACHE_SENDER = "prfaas-cache"  # the PrfaaS cache pool's process: it sends shipped prefixes
_ARRIVAL, _PREFILL_END, _LINK, _KV_ARRIVE, _DECODE, _MARK, _REPLAN, _SAMPLE = range(8)


@dataclass(frozen=True)
class SimSpec:
    """One simulated deployment, its traffic and its policy."""

    model: ModelProfile
    prfaas_hw: HardwareProfile
    n_prfaas: int
    pd_hw: HardwareProfile
    n_p: int
    n_d: int
    link_gbps: float
    workload: Workload
    output_tokens: int
    rate_rps: float
    duration_s: float
    policy_config: PolicyConfig
    policy: str = "static-threshold"
    warmup_s: float = 0.0
    link_rtt_s: float = 0.005  # assumed: same-region datacenters
    link_schedule: tuple[tuple[float, float], ...] = ()  # (time_s, capacity_gbps) changes
    link_sharing: str = "sender-fifo"  # as kvwire paces (each sender's transfers oldest first), or "fair"
    request_timeout_s: float = 60.0  # a request without its first token by then is lost
    prefix_hit_prob: float = 0.0  # chance that a request finds part of its prompt cached ...
    prefix_hit_fraction: float = 0.5  # ... this fraction of it, on one random prefill instance
    intra_dc_gbps: float = 400.0  # assumed RDMA inside the PD site
    drain: bool = True  # after the last arrival, run until every request finishes
    replan_interval_s: float | None = None  # slow timescale: re-plan t and N_p/N_d this often (None: off)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    seed: int = 0

    @property
    def budget_gbps(self) -> float:
        """The pacing budget of the PrfaaS -> PD pair."""
        return self.telemetry.budget_gbps or self.link_gbps


@dataclass
class SimRun:
    """Everything a run produced: requests, link integrals at the window marks, server busy time."""

    spec: SimSpec
    requests: list[SimRequest]
    link_marks: list[tuple[float, float, float]]  # (busy_bit_s, capacity_bit_s, overload_s) at warmup, end
    events: int
    decisions: dict[str, int]
    role_changes: list[tuple[float, int, int]] = field(default_factory=list)  # (time_s, t, N_p)


class Simulator:
    """Runs one SimSpec to completion."""

    def __init__(self, spec: SimSpec, progress: Callable[[float], None] | None = None) -> None:
        self.spec = spec
        self.progress = progress
        self.policy = make_policy(spec.policy, spec.policy_config)
        self.rng = random.Random(spec.seed)
        self.prefill = [PrefillServer(f"prfaas-{i}", PRFAAS_SITE, spec.prfaas_hw) for i in range(spec.n_prfaas)]
        self.prefill += [PrefillServer(f"pd-{i}", PD_SITE, spec.pd_hw) for i in range(spec.n_p)]
        self.decode = [DecodeServer(f"pd-{spec.n_p + i}", PD_SITE, spec.pd_hw, spec.model) for i in range(spec.n_d)]
        self._prefill_by_name = {s.name: s for s in self.prefill}
        self._decode_by_name = {s.name: s for s in self.decode}
        self.draining: set[str] = set()  # instances changing role: out of the view until idle
        self.role_changes: list[tuple[float, int, int]] = []  # (time, threshold, N_p) applied by the slow loop
        self.slow, self.plan_inputs = None, None
        if spec.replan_interval_s:
            self.slow = SlowTimescale()
            self.plan_inputs = PlanInputs(
                spec.model,
                spec.prfaas_hw,
                spec.n_prfaas,
                spec.pd_hw,
                spec.n_p + spec.n_d,
                spec.link_gbps,
                spec.workload,
                spec.output_tokens,
            )
        budget = spec.budget_gbps  # paced senders never send faster than the budget
        schedule = tuple((at, min(gbps, budget)) for at, gbps in spec.link_schedule)
        self.link = MeteredLink(min(spec.link_gbps, budget), budget, schedule, spec.link_sharing)
        tel = spec.telemetry
        self.senders = [s.name for s in self.prefill if s.site == PRFAAS_SITE] + [CACHE_SENDER]
        self.sampler = LinkSampler(self.link, PRFAAS_SITE, PD_SITE, spec.link_rtt_s, tel.window_bytes, tel.ack_delay_s)
        self.telemetry = LinkTelemetry(tel.router, {(PRFAAS_SITE, PD_SITE): budget})
        self._in_transit: deque[tuple[float, str, object]] = deque()  # (received at, sender, LinkStats)
        self._events: list[tuple[float, int, int, object, int]] = []
        self._seq = 0
        self._link_version = 0
        self.decisions: dict[str, int] = {}

    # --- event plumbing -------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: object = None, version: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload, version))

    def _reschedule_link(self) -> None:
        self._link_version += 1
        t = self.link.next_event_s()
        if t < float("inf"):
            self._push(t, _LINK, None, self._link_version)

    def _link_done(self, flows: list[Flow], now: float) -> None:
        for flow in flows:
            req, shipping = flow.key
            if shipping:  # a cached prefix arrived at the PD site: the local prefill can queue
                self._enqueue_prefill(req, now)
            else:
                self._push(now + self.spec.link_rtt_s / 2, _KV_ARRIVE, req)

    def _reschedule_decode(self, server: DecodeServer) -> None:
        server.version += 1
        t = server.next_completion_s()
        if t < float("inf"):
            self._push(t, _DECODE, server, server.version)

    # --- the live view the policy reads ---------------------------------------------------

    def _sample(self, index: int, now: float) -> None:
        """Sender ``index`` publishes its LinkStats; the router has them ``lag_s`` later."""
        self._link_done(self.link.advance(now), now)
        self._reschedule_link()
        sender = self.senders[index]
        self._in_transit.append((now + self.spec.telemetry.lag_s, sender, self.sampler.sample(sender, now)))

    def _link_view(self, now: float) -> LinkView:
        """The link as the router knows it at ``now``: the LinkStats received so far."""
        transit = self._in_transit
        while transit and transit[0][0] <= now:
            received_at, sender, stats = transit.popleft()
            self.telemetry.ingest(stats, received_at, sender)
        return self.telemetry.view(PRFAAS_SITE, PD_SITE, now)

    def _view(self, now: float) -> ClusterView:
        self._link_done(self.link.advance(now), now)
        self._reschedule_link()
        link = self._link_view(now)
        if self.slow is not None:
            self.slow.observe_link(link.effective_gbps)
        servers = [s for s in self.prefill + self.decode if s.name not in self.draining]
        instances = tuple(s.view(now) for s in servers)
        return ClusterView(model=self.spec.model, decode_site=PD_SITE, instances=instances, links=(link,))

    # --- request life -----------------------------------------------------------------------

    def _route(self, req: SimRequest, now: float) -> None:
        spec = self.spec
        request = RouteRequest(str(req.rid), req.prompt_tokens, req.output_tokens, req.cached)
        decision = self.policy.decide(self._view(now), request, now=now, rng=self.rng)
        self.decisions[decision.choice] = self.decisions.get(decision.choice, 0) + 1
        server = self._prefill_by_name[decision.prefill_instance]
        req.prefill = server
        req.decode = self._decode_by_name[decision.decode_instance]
        req.decode.pending += 1
        req.remote = server.site != PD_SITE
        uncached = req.prompt_tokens - decision.reused_prefix_tokens
        req.prefill_s = spec.model.prefill_time_s(uncached, server.hardware)
        if decision.shipped_prefix_bytes:
            flow = Flow((req, True), decision.shipped_prefix_bytes, now, now, CACHE_SENDER)
            self._link_done(self.link.add(flow, now), now)
            self._reschedule_link()
        else:
            self._enqueue_prefill(req, now)

    def _enqueue_prefill(self, req: SimRequest, now: float) -> None:
        started = req.prefill.enqueue(req, now)
        if started is not None:
            self._prefill_started(started, now)

    def _prefill_started(self, req: SimRequest, now: float) -> None:
        self._push(req.prefill_end_s, _PREFILL_END, req.prefill)
        if req.remote:
            kv_bytes = self.spec.model.kv_bytes(req.prompt_tokens)
            flow = Flow((req, False), kv_bytes, now, req.prefill_end_s, req.prefill.name)
            self._link_done(self.link.add(flow, now), now)
            self._reschedule_link()

    def _prefill_ended(self, server: PrefillServer, now: float) -> None:
        req = server.current
        if not req.remote:
            intra_s = self.spec.model.kv_bytes(req.prompt_tokens) * 8 / (self.spec.intra_dc_gbps * 1e9)
            self._push(now + intra_s, _KV_ARRIVE, req)
        nxt = server.start_next(now)
        if nxt is not None:
            self._prefill_started(nxt, now)
        elif server.name in self.draining:
            self._finish_drain(server)

    # --- slow timescale: threshold and role changes ---------------------------------------

    def _replan(self, now: float) -> None:
        if self.draining:
            return  # a role change is still in progress
        local_p = [s for s in self.prefill if s.site == PD_SITE]
        measured = self.slow.measured_link_gbps() or self._link_view(now).effective_gbps
        proposal = self.slow.propose(self.plan_inputs, measured, self.policy.config.threshold_tokens, len(local_p))
        if proposal is None:
            return
        threshold, n_p = proposal
        self.policy = make_policy(self.spec.policy, replace(self.policy.config, threshold_tokens=threshold))
        self.role_changes.append((now, threshold, n_p))
        if n_p > len(local_p):  # decode -> prefill: the least busy decode instances drain first
            movers = sorted(self.decode, key=lambda d: len(d.active) + len(d.waiting) + d.pending)
            for server in movers[: n_p - len(local_p)]:
                self.draining.add(server.name)
                self._finish_drain(server)
        elif n_p < len(local_p):  # prefill -> decode
            for server in sorted(local_p, key=lambda p: p.queued_work_s)[: len(local_p) - n_p]:
                self.draining.add(server.name)
                self._finish_drain(server)

    def _finish_drain(self, server: PrefillServer | DecodeServer) -> None:
        """Switch a draining instance to its other role once it holds no work."""
        if isinstance(server, DecodeServer):
            if server.active or server.waiting or server.pending:
                return
            self.decode.remove(server)
            new = PrefillServer(server.name, PD_SITE, self.spec.pd_hw)
            self.prefill.append(new)
            self._prefill_by_name[new.name] = new
        else:
            if server.current is not None or server.queue:
                return
            self.prefill.remove(server)
            new = DecodeServer(server.name, PD_SITE, self.spec.pd_hw, self.spec.model)
            self.decode.append(new)
            self._decode_by_name[new.name] = new
        self.draining.discard(server.name)

    # --- main loop --------------------------------------------------------------------------

    def _arrivals(self) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec
        gen = np.random.default_rng(spec.seed)
        n = int(spec.rate_rps * spec.duration_s * 1.2 + 50)
        times = np.cumsum(gen.exponential(1.0 / spec.rate_rps, n))
        times = times[times < spec.duration_s]
        return times, spec.workload.sample(gen, len(times))

    def _cached(self, tokens: int) -> dict[str, int]:
        spec = self.spec
        if spec.prefix_hit_prob <= 0 or self.rng.random() >= spec.prefix_hit_prob:
            return {}
        holder = self.rng.choice(self.prefill)
        return {holder.name: int(tokens * spec.prefix_hit_fraction) // 64 * 64}

    def run(self) -> SimRun:
        """Simulate until the last request finishes (or the drain limit) and return the raw run."""
        spec = self.spec
        times, lengths = self._arrivals()
        requests: list[SimRequest] = []
        marks: list[tuple[float, float, float]] = []
        self._push(spec.warmup_s, _MARK)
        self._push(spec.duration_s, _MARK)
        if spec.replan_interval_s:
            self._push(spec.replan_interval_s, _REPLAN)
        interval = spec.telemetry.interval_s
        for i in range(len(self.senders)):
            self._push(interval * (1 + i / len(self.senders)), _SAMPLE, i)
        next_arrival = 0
        if len(times):
            self._push(float(times[0]), _ARRIVAL)
        limit_s = spec.duration_s + (4 * spec.request_timeout_s if spec.drain else 0.0)
        events = 0
        next_progress = 0.0
        while self._events:
            now, _, kind, payload, version = heapq.heappop(self._events)
            if now > limit_s:
                break
            events += 1
            if self.progress is not None and now >= next_progress:
                self.progress(now)
                next_progress = now + spec.duration_s / 100
            if kind == _ARRIVAL:
                i = next_arrival
                req = SimRequest(i, now, int(lengths[i]), spec.output_tokens, self._cached(int(lengths[i])))
                requests.append(req)
                if self.slow is not None:
                    self.slow.observe(req.prompt_tokens)
                self._route(req, now)
                next_arrival += 1
                if next_arrival < len(times):
                    self._push(float(times[next_arrival]), _ARRIVAL)
            elif kind == _PREFILL_END:
                self._prefill_ended(payload, now)
            elif kind == _LINK:
                if version == self._link_version:
                    self._link_done(self.link.advance(now), now)
                    self._reschedule_link()
            elif kind == _KV_ARRIVE:
                payload.decode.arrive(payload, now)
                self._reschedule_decode(payload.decode)
            elif kind == _DECODE:
                if version == payload.version:
                    payload.complete(now)
                    self._reschedule_decode(payload)
                    if payload.name in self.draining:
                        self._finish_drain(payload)
            elif kind == _REPLAN:
                self._replan(now)
                if now + spec.replan_interval_s < spec.duration_s:
                    self._push(now + spec.replan_interval_s, _REPLAN)
            elif kind == _SAMPLE:
                self._sample(payload, now)
                if len(self._events) >= len(self.senders):  # something besides the other senders' samples
                    self._push(now + spec.telemetry.interval_s, _SAMPLE, payload)
            elif kind == _MARK:
                self._link_done(self.link.advance(now), now)
                self._reschedule_link()
                marks.append((self.link.busy_bit_s, self.link.capacity_bit_s, self.link.overload_s))
                if not spec.drain and len(marks) == 2:
                    break
        return SimRun(
            spec=spec,
            requests=requests,
            link_marks=marks,
            events=events,
            decisions=dict(self.decisions),
            role_changes=self.role_changes,
        )
