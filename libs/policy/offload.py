"""The paper's offload rules: static threshold, adaptive (fast timescale), and the two baselines."""

from __future__ import annotations

from libs.policy.decision import Choice, Policy, no_remote
from libs.policy.evaluate import Evaluation
from libs.policy.view import ClusterView, LinkView, RouteRequest


class LocalOnly(Policy):
    """Homogeneous-PD baseline: every request is prefilled at the PD site."""

    name = "local-only"

    def choose(self, view: ClusterView, request: RouteRequest, evaluation: Evaluation) -> Choice:
        """Local if there is a local prefill instance, else remote (said so)."""
        t = self.config.threshold_tokens
        incremental = request.prompt_tokens - evaluation.cached_local_tokens
        if evaluation.local is not None:
            return Choice(evaluation.local, "local-only policy", incremental, t)
        return Choice(evaluation.remote, "local-only policy but no local prefill instance", incremental, t)


class RemoteOnly(Policy):
    """Naive-heterogeneous baseline: every request is prefilled at a PrfaaS site."""

    name = "remote-only"

    def choose(self, view: ClusterView, request: RouteRequest, evaluation: Evaluation) -> Choice:
        """Remote if a PrfaaS site is reachable, else local (said so)."""
        incremental = request.prompt_tokens - evaluation.cached_remote_tokens
        if evaluation.remote is not None:
            return Choice(evaluation.remote, "remote-only policy", incremental, 0)
        return Choice(evaluation.local, f"remote-only policy but {no_remote(view)}", incremental, 0)


class StaticThreshold(Policy):
    """The paper's rule: offload iff the uncached length at the PD site exceeds the threshold t."""

    name = "static-threshold"

    def choose(self, view: ClusterView, request: RouteRequest, evaluation: Evaluation) -> Choice:
        """Compare the incremental (uncached at the PD site) length with t."""
        t = self.config.threshold_tokens
        incremental = request.prompt_tokens - evaluation.cached_local_tokens
        local, remote = evaluation.local, evaluation.remote
        if remote is None:
            return Choice(local, f"uncached {incremental:,} tokens; {no_remote(view)}", incremental, t)
        if local is None:
            return Choice(remote, f"uncached {incremental:,} tokens; no local prefill instance", incremental, t)
        if incremental > t:
            return Choice(remote, f"uncached {incremental:,} > t={t:,}", incremental, t)
        return Choice(local, f"uncached {incremental:,} <= t={t:,}", incremental, t)


def _clip01(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


class Adaptive(Policy):
    """The paper's fast timescale: raise t as PrfaaS egress or queue nears its limit; cache-aware."""

    name = "adaptive"
    ships_prefixes = True

    def pressure(self, link: LinkView, link_delay_s: float, remote_wait_s: float, local_wait_s: float) -> float:
        """0 (no pressure) .. 1 (at the limit) from link utilisation, link backlog and the remote path's wait.

        The remote path's wait is the PrfaaS queue plus the link's backlog. A local prefill queue
        longer than that relieves the pressure by the same measure, so raising t never piles more
        work onto a local cluster that is already the busier path.
        """
        cfg = self.config
        by_util = (link.utilization - cfg.raise_start_utilization) / (
            cfg.raise_full_utilization - cfg.raise_start_utilization
        )
        by_backlog = link_delay_s / cfg.backlog_limit_s
        by_queue = (remote_wait_s - local_wait_s) / cfg.queue_limit_s
        return _clip01(max(by_util, by_backlog, by_queue) + min(0.0, by_queue))

    def effective_threshold(self, pressure: float) -> int:
        """t raised geometrically towards ``max_threshold_tokens`` as pressure goes from 0 to 1."""
        cfg = self.config
        t = max(cfg.threshold_tokens, 1)
        return int(t * (cfg.max_threshold_tokens / t) ** pressure)

    def choose(self, view: ClusterView, request: RouteRequest, evaluation: Evaluation) -> Choice:
        """Offload iff the uncached length exceeds the raised t; which cache counts depends on bandwidth."""
        cfg = self.config
        local, remote = evaluation.local, evaluation.remote
        prompt = request.prompt_tokens
        cached_local, cached_remote = evaluation.cached_local_tokens, evaluation.cached_remote_tokens
        if remote is None or local is None:
            only = local or remote
            why = no_remote(view) if remote is None else "no local prefill instance"
            return Choice(only, why, prompt - cached_local, cfg.threshold_tokens)
        link = remote.link
        local_wait = local.scored.least_wait_s
        prefilling = sum(1 for row in remote.scored.rows if row[4].queue_depth > 0)
        link_delay = link.delay_s(prefilling)
        # The remote path's wait: the PrfaaS queue plus the link's backlog.
        pressure = self.pressure(link, link_delay, remote.scored.least_wait_s + link_delay, local_wait)
        t_eff = self.effective_threshold(pressure)
        scarce = link.utilization >= cfg.scarce_utilization or link_delay >= cfg.backlog_limit_s / 2
        raised = f"t raised {cfg.threshold_tokens:,}->{t_eff:,} (pressure {pressure:.2f})" if pressure > 0 else ""
        if scarce:
            # Each cluster's cache is judged on its own; nothing is shipped between clusters.
            incremental = prompt - cached_local
            head = f"bandwidth scarce (link {link.utilization:.0%} busy); uncached at PD site {incremental:,}"
            if incremental > t_eff:
                return Choice(remote, _join(f"{head} > t_eff={t_eff:,}", raised), incremental, t_eff, "scarce")
            return Choice(local, _join(f"{head} <= t_eff={t_eff:,}", raised), incremental, t_eff, "scarce")
        # Bandwidth plentiful: the longest prefix anywhere counts, and may be shipped to the PD site.
        incremental = prompt - max(cached_local, cached_remote)
        head = f"bandwidth plentiful; uncached after best prefix {incremental:,}"
        if incremental > t_eff:
            return Choice(remote, _join(f"{head} > t_eff={t_eff:,}", raised), incremental, t_eff)
        if evaluation.remote_prefix is not None:
            return Choice(evaluation.remote_prefix, _join(f"{head} <= t_eff={t_eff:,}", raised), incremental, t_eff)
        return Choice(local, _join(f"{head} <= t_eff={t_eff:,}", raised), incremental, t_eff)


def _join(head: str, tail: str) -> str:
    return f"{head}; {tail}" if tail else head
