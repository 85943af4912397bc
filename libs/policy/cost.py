"""Cost-model policy (beyond the paper): the lowest predicted TTFT, without unbalancing the clusters.

Every option's TTFT comes from the live view (queue, prefill on that hardware with its cache hit,
transfer with layer-wise overlap at the bandwidth the link can give, wait for a decode slot). The
threshold rule's choice is the plan (it is the split that keeps both prefill paths saturating
together, so the decode cluster is never starved of prefilled requests); another option replaces
it only when it is predicted to be faster and
  - its path is no more delayed than the plan's (queue, plus exposed transfer for a remote path),
    so moving work there does not unbalance the producers, and
  - it does not add optional traffic to a link that is already over ``link_budget``.
"""

from __future__ import annotations

from libs.policy.decision import Choice, Policy
from libs.policy.evaluate import LOCAL, Evaluation, Option
from libs.policy.view import ClusterView, RouteRequest


def _predicted_utilization(option: Option) -> float:
    """Link utilisation once this option's transfer streams: it takes part of the idle bandwidth."""
    u = option.link.utilization
    return u + option.added_utilization * max(0.0, 1.0 - u)


def _path_delay_s(option: Option) -> float:
    """Delay that is not this request's own compute: queue wait plus exposed transfer."""
    return option.queue_s + option.transfer_s


class CostModel(Policy):
    """Pick the fastest option that keeps the link under budget and the prefill paths balanced."""

    name = "cost-model"
    ships_prefixes = True

    def choose(self, view: ClusterView, request: RouteRequest, evaluation: Evaluation) -> Choice:
        """Start from the threshold rule's option; take a faster one that passes both guards."""
        cfg = self.config
        t = cfg.threshold_tokens
        incremental = request.prompt_tokens - evaluation.cached_local_tokens
        local, remote = evaluation.local, evaluation.remote
        plan = remote if (incremental > t and remote is not None) or local is None else local
        best, why = plan, f"plan (uncached {incremental:,} {'>' if plan.kind != LOCAL else '<='} t={t:,})"
        for option in evaluation.options():
            if option is plan or option.ttft_s >= best.ttft_s:
                continue
            if _path_delay_s(option) > _path_delay_s(plan) + cfg.tie_tolerance_s:
                continue  # its path is the busier one: taking it would unbalance the producers
            if option.link is not None and _predicted_utilization(option) > cfg.link_budget:
                continue  # optional traffic on a link over its budget
            best = option
            why = f"faster than the plan ({plan.ttft_s:.2f}s) on a less delayed path"
        reason = f"predicted TTFT {best.ttft_s:.2f}s, {why}"
        link = remote.link if remote is not None else None
        bandwidth = "scarce" if link is not None and link.utilization > cfg.link_budget else "plentiful"
        return Choice(best, reason, incremental, t, bandwidth)
