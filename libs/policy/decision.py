"""The policy interface and the RouteDecision every policy returns."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from operator import itemgetter

from libs.common.messages import RouteCandidate, RouteDecision, RouteSignals
from libs.policy.config import PolicyConfig
from libs.policy.evaluate import LOCAL, Evaluation, Option, evaluate
from libs.policy.view import ClusterView, RouteRequest

_FIRST = itemgetter(0)


@dataclass(frozen=True, slots=True)
class Choice:
    """What a policy picked and why, with the threshold facts it used."""

    option: Option
    reason: str
    incremental_tokens: int
    effective_threshold_tokens: int
    bandwidth: str = "plentiful"


class Policy(ABC):
    """Base of the routing policies: evaluate the options, let the subclass choose, report it all."""

    name = "policy"
    ships_prefixes = False  # True for policies that may ship a cached prefix between sites

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def decide(self, view: ClusterView, request: RouteRequest, *, now: float, rng: random.Random) -> RouteDecision:
        """Place ``request`` on ``view``: a RouteDecision with candidates, signals and predictions."""
        evaluation = evaluate(view, request, rng, self.config, self.ships_prefixes)
        choice = self.choose(view, request, evaluation)
        return _decision(self.name, self.config, view, request, evaluation, choice, now)

    @abstractmethod
    def choose(self, view: ClusterView, request: RouteRequest, evaluation: Evaluation) -> Choice:
        """Pick one of ``evaluation``'s options (implemented by each policy)."""


def no_remote(view: ClusterView) -> str:
    """Why no PrfaaS site is an option: the view's notes (a link's open breaker), else ``no PrfaaS site reachable``."""
    return "; ".join(view.unavailable) or "no PrfaaS site reachable"


def describe(option: Option) -> str:
    """A short human description of where an option runs."""
    inst = option.chosen.instance
    where = f"{inst.site}/{inst.name} ({inst.hardware.name})"
    if option.kind == LOCAL:
        return f"prefill locally on {where}"
    if option.shipped_prefix_bytes:
        return f"ship {option.chosen.cached_tokens:,}-token prefix from {option.prefix_source_site}, prefill on {where}"
    return f"prefill remotely on {where}, stream {option.transfer_bytes / 1e9:.2f} GB of KV"


def _candidates(evaluation: Evaluation, limit: int) -> list[RouteCandidate]:
    rows = []
    for option in evaluation.options():
        extra = option.ttft_s - option.chosen.finish_s  # transfer, decode wait and first step
        rows += [
            (finish + extra, option, queue, prefill, hit, inst)
            for finish, queue, prefill, hit, inst in option.scored.rows
        ]
    return [
        RouteCandidate(
            option=option.kind,
            site=inst.site,
            instance=inst.name,
            cached_tokens=hit,
            queue_s=queue,
            prefill_s=prefill,
            transfer_s=option.transfer_s,
            ttft_s=score,
            score=score,
        )
        for score, option, queue, prefill, hit, inst in sorted(rows, key=_FIRST)[:limit]
    ]


def _decision(
    policy: str,
    config: PolicyConfig,
    view: ClusterView,
    request: RouteRequest,
    evaluation: Evaluation,
    choice: Choice,
    now: float,
) -> RouteDecision:
    option = choice.option
    remote = evaluation.remote
    link = remote.link if remote is not None else None
    local_wait = evaluation.local.scored.least_wait_s if evaluation.local is not None else 0.0
    remote_wait = remote.scored.least_wait_s if remote is not None else 0.0
    signals = RouteSignals(
        prompt_tokens=request.prompt_tokens,
        incremental_tokens=choice.incremental_tokens,
        cached_local_tokens=evaluation.cached_local_tokens,
        cached_remote_tokens=evaluation.cached_remote_tokens,
        threshold_tokens=config.threshold_tokens,
        effective_threshold_tokens=choice.effective_threshold_tokens,
        kv_bytes=evaluation.kv_bytes,
        link_capacity_gbps=link.capacity_gbps if link else 0.0,
        link_effective_gbps=link.effective_gbps if link else 0.0,
        link_utilization=link.utilization if link else 0.0,
        link_rtt_s=link.rtt_s if link else 0.0,
        prfaas_wait_s=remote_wait,
        local_wait_s=local_wait,
        decode_free_slots=evaluation.decode.free_decode_slots,
        bandwidth=choice.bandwidth,
    )
    inst = option.chosen.instance
    return RouteDecision(
        request_id=request.request_id,
        policy=policy,
        ts=now,
        choice=LOCAL if option.site == view.decode_site else "remote",
        prefill_site=inst.site,
        prefill_instance=inst.name,
        decode_site=view.decode_site,
        decode_instance=evaluation.decode.name,
        transport=config.transport,
        reason=f"{choice.reason}: {describe(option)}",
        predicted_queue_s=max(option.queue_s, 0.0),
        predicted_prefill_s=option.prefill_s,
        predicted_transfer_s=option.transfer_s,
        predicted_ttft_s=option.ttft_s,
        transfer_bytes=option.transfer_bytes,
        reused_prefix_tokens=option.chosen.cached_tokens,
        prefix_source_site=option.prefix_source_site if option.chosen.cached_tokens else "",
        shipped_prefix_bytes=option.shipped_prefix_bytes,
        candidates=_candidates(evaluation, config.max_candidates),
        signals=signals,
    )
