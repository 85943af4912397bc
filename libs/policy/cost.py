"""Cost-model policy (beyond the paper): the lowest predicted TTFT, without unbalancing the clusters.

Every option's TTFT comes from the live view (queue, prefill on that hardware with its cache hit,
transfer with layer-wise overlap at the bandwidth the link can give, wait for a decode slot). The
adaptive rule's choice is the plan (the threshold split keeps both prefill paths saturating
together, so the decode cluster is never starved of prefilled requests, and the raised threshold
keeps the link under pressure in check); another option replaces it only when it is predicted to
be faster and
  - its pool has an idle instance (the extra work uses spare capacity and delays no request
    planned for that pool: greedy per-request choices would pile long prompts onto one path), or
    the request has a TTFT target that the plan is predicted to miss and this option to meet, and
  - it does not add optional traffic to a link over ``link_budget`` or already backlogged.
"""

from __future__ import annotations

from libs.policy.decision import Choice
from libs.policy.evaluate import Evaluation, Option
from libs.policy.offload import Adaptive
from libs.policy.view import ClusterView, RouteRequest


def _over_budget(option: Option, budget: float) -> bool:
    """True when this option's transfer would push its link past the budget, or the link is backlogged."""
    link = option.link
    return link.utilization + option.added_utilization > budget or link.backlog_s > 0.5


class CostModel(Adaptive):
    """Pick the fastest option that keeps the link under budget and the prefill paths balanced."""

    name = "cost-model"
    ships_prefixes = True

    def choose(self, view: ClusterView, request: RouteRequest, evaluation: Evaluation) -> Choice:
        """Start from the adaptive rule's option; take a faster one that passes both guards."""
        cfg = self.config
        slo = request.ttft_slo_s
        plan = super().choose(view, request, evaluation)
        best = plan.option
        rescued = False
        for option in evaluation.options():
            if option is plan.option or option.ttft_s >= best.ttft_s:
                continue
            if option.link is not None and _over_budget(option, cfg.link_budget):
                continue  # optional traffic on a link over its budget
            rescues = slo is not None and best.ttft_s > slo >= option.ttft_s
            if not rescues and option.scored.least_wait_s > cfg.tie_tolerance_s:
                continue  # no idle instance there: the extra work would delay the requests planned for it
            best, rescued = option, rescued or rescues
        if best is plan.option:
            reason = f"predicted TTFT {best.ttft_s:.2f}s, as planned ({plan.reason})"
        elif rescued:
            reason = (
                f"predicted TTFT {best.ttft_s:.2f}s meets the {slo:.2f}s target the plan's "
                f"{plan.option.ttft_s:.2f}s misses (plan: {plan.reason})"
            )
        else:
            reason = (
                f"predicted TTFT {best.ttft_s:.2f}s beats the plan's {plan.option.ttft_s:.2f}s on idle capacity"
                f" (plan: {plan.reason})"
            )
        return Choice(best, reason, plan.incremental_tokens, plan.effective_threshold_tokens, plan.bandwidth)
