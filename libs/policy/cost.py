"""Cost-model policy (beyond the paper): the option with the lowest predicted TTFT within budget.

Every option's TTFT comes from the live view (queue, prefill on that hardware with its cache hit,
transfer with layer-wise overlap and the link's backlog, wait for a decode slot). An option that
would push its link past ``link_budget`` of goodput is excluded unless every option is. Prefill
never runs on decode instances, and an option that needs a decode slot when none is free is
charged the predicted wait for one, so local decode capacity is not starved of slots.
"""

from __future__ import annotations

from libs.policy.decision import Choice, Policy
from libs.policy.evaluate import Evaluation
from libs.policy.view import ClusterView, RouteRequest


class CostModel(Policy):
    """Pick the option with the lowest predicted TTFT that keeps the link under its budget."""

    name = "cost-model"

    def choose(self, view: ClusterView, request: RouteRequest, evaluation: Evaluation) -> Choice:
        """Minimise predicted TTFT over the options within the link budget (all, if none is)."""
        budget = self.config.link_budget
        options = evaluation.options()
        within = [o for o in options if o.link is None or o.link.utilization + o.added_utilization <= budget]
        pool = within or options
        best = min(pool, key=lambda o: o.ttft_s)
        over = len(options) - len(within)
        reason = f"lowest predicted TTFT {best.ttft_s:.2f}s of {len(pool)} option(s)"
        if over and within:
            reason += f"; {over} excluded (link over {budget:.0%} budget)"
        elif over:
            reason += f"; every option over the {budget:.0%} link budget"
        incremental = request.prompt_tokens - best.chosen.cached_tokens
        t = self.config.threshold_tokens
        return Choice(best, reason, incremental, t, "scarce" if over else "plentiful")
