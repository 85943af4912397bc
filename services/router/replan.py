"""The slow timescale, live: every few minutes re-plan the threshold t from what the router has seen.

The workload is the uncached lengths of the last ``replan_history`` requests, the link bandwidth the
median of what the decisions since the last re-plan read from the link telemetry, the deployment the live instances (PrfaaS prefill at the
remote site, prefill and decode at this site). ``libs.planner.replan.SlowTimescale`` decides whether
a new t raises the modelled throughput enough; the new t is applied to the policy and published as a
``ThresholdChanged`` event. Role changes (the proposed local prefill count) are reported, not applied:
moving an instance between prefill and decode is the operator's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import numpy as np
from prometheus_client import Gauge

from libs.common.errors import PrfaasError
from libs.common.messages import DecisionEvent, InstanceLoad, ThresholdChanged
from libs.engine.profiles import HARDWARE, hardware_profile, model_profile
from libs.planner.replan import MIN_OBSERVED, SlowTimescale
from libs.planner.search import PlanInputs
from libs.planner.workloads import Empirical
from services.router.config import RouterConfig
from services.router.events import DecisionLog
from services.router.live_view import LiveView
from services.router.scheduler import Scheduler

log = logging.getLogger(__name__)


def _most_common(values: list[str]) -> str:
    return Counter(values).most_common(1)[0][0]


class Replanner:
    """Re-plans t periodically and publishes the change."""

    def __init__(
        self, config: RouterConfig, scheduler: Scheduler, view: LiveView, events: DecisionLog, threshold_gauge: Gauge
    ) -> None:
        self.config = config
        self.threshold_gauge = threshold_gauge
        self.scheduler = scheduler
        self.view = view
        self.events = events
        self.slow = SlowTimescale(history=config.replan_history)

    def observe(self, event: DecisionEvent) -> None:
        """Record a request's first decision: its uncached length and the link bandwidth the policy read."""
        self.slow.observe(event.incremental_tokens)
        d = event.decision
        site = (
            d.prefill_site if d.choice == "remote" else next((c.site for c in d.candidates if c.option == "remote"), "")
        )
        if site and d.signals.link_capacity_gbps > 0:
            self.slow.observe_link(d.signals.link_effective_gbps, site)

    async def run(self) -> None:
        """Re-plan every ``replan_interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(self.config.replan_interval_s)
            try:
                await self.replan_once()
            except PrfaasError as e:
                log.warning("re-plan skipped", extra={"error": str(e)})
            except Exception:  # a bug in one re-plan must not end the slow timescale
                log.exception("re-plan failed")

    def _hardware(self, loads: list[InstanceLoad]) -> str:
        return _most_common([ld.hardware if ld.hardware in HARDWARE else self.config.default_hardware for ld in loads])

    def _inputs(self) -> tuple[PlanInputs, int, str] | None:
        """Plan inputs from the live deployment of the most deployed model, the local prefill count, the PrfaaS site."""
        alive = self.view.alive()
        if not alive:
            return None
        model = _most_common([ld.model for ld in alive])
        loads = [ld for ld in alive if ld.model == model]
        site = self.view.decode_site
        remote = [ld for ld in loads if ld.role == "prefill" and ld.site != site]
        local = [ld for ld in loads if ld.site == site]
        if not remote or len(local) < 2:
            return None
        prfaas_site = _most_common([ld.site for ld in remote])
        remote = [ld for ld in remote if ld.site == prfaas_site]
        link_gbps = self.view.link_gbps(prfaas_site)
        if link_gbps is None:
            return None
        inputs = PlanInputs(
            model=model_profile(self.config.profile_of(model)),
            prfaas_hw=hardware_profile(self._hardware(remote)),
            n_prfaas=len(remote),
            pd_hw=hardware_profile(self._hardware(local)),
            n_pd=len(local),
            link_gbps=link_gbps,
            workload=Empirical(lengths=np.fromiter(self.slow.lengths, dtype=np.int64), source="observed"),
            output_tokens=self.config.default_max_tokens,
        )
        return inputs, sum(1 for ld in local if ld.role == "prefill"), prfaas_site

    async def replan_once(self) -> ThresholdChanged | None:
        """One re-plan: the event if t changed, else None (too few requests seen, or no better plan)."""
        observed = self.slow.observed()
        if observed < MIN_OBSERVED:
            return None
        found = self._inputs()
        if found is None:
            return None
        inputs, n_p, prfaas_site = found
        # The median of what the decisions since the last re-plan saw, so a transient does not move t (the view's
        # bandwidth now if no decision saw the link); each sample is used once.
        link_gbps = self.slow.measured_link_gbps(prfaas_site) or inputs.link_gbps
        old = self.scheduler.policy.config.threshold_tokens
        proposal = await asyncio.to_thread(self.slow.propose, inputs, link_gbps, old, n_p)
        if proposal is None:
            return None
        threshold, proposed_n_p = proposal
        self.scheduler.set_threshold(threshold)
        self.threshold_gauge.set(threshold)
        event = ThresholdChanged(
            site=self.config.site,
            router=self.config.router_id,
            ts=time.time(),
            policy=self.scheduler.policy.name,
            old_threshold_tokens=old,
            threshold_tokens=threshold,
            link_gbps=link_gbps,
            observed_requests=observed,
            n_p=n_p,
            proposed_n_p=proposed_n_p,
        )
        log.info("threshold re-planned", extra={"old": old, "new": threshold, "link_gbps": round(link_gbps, 3)})
        await self.events.plan(event)
        return event
