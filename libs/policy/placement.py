"""Instance choice: least expected finish with cache affinity, and a random tie-break.

A prefill instance is scored by when it would finish this request: its expected wait plus the
prefill time of the tokens it does not already hold (so a cache hit shortens the score). Scores
within a tolerance of the best are ties, broken at random, so several routers reading the same
view spread their requests instead of herding onto one instance.
"""

from __future__ import annotations

import random

from libs.policy.config import PolicyConfig
from libs.policy.view import ClusterView, InstanceView, RouteRequest


class ScoredInstance:
    """A prefill instance with its predicted wait, prefill time and finish for one request."""

    __slots__ = ("instance", "cached_tokens", "queue_s", "prefill_s", "finish_s")

    def __init__(self, instance: InstanceView, cached_tokens: int, queue_s: float, prefill_s: float) -> None:
        self.instance = instance
        self.cached_tokens = cached_tokens
        self.queue_s = queue_s
        self.prefill_s = prefill_s
        self.finish_s = queue_s + prefill_s  # seconds from now until the prefill would finish


def score_prefill(
    view: ClusterView, pool: tuple[InstanceView, ...], request: RouteRequest, reuse_tokens: int = 0
) -> list[ScoredInstance]:
    """Score every instance of ``pool``; ``reuse_tokens`` is a prefix shipped in from elsewhere."""
    model = view.model
    cached = request.cached_tokens
    prompt = request.prompt_tokens
    times: dict[tuple[str, int], float] = {}  # equal hardware and hit -> equal prefill time
    out = []
    for inst in pool:
        hit = cached.get(inst.name, 0) if cached else 0
        if reuse_tokens > hit:
            hit = reuse_tokens
        if hit >= prompt:  # at least the last token is computed to produce logits
            hit = prompt - 1
        key = (inst.hardware.name, hit)
        prefill_s = times.get(key)
        if prefill_s is None:
            prefill_s = times[key] = model.prefill_time_s(prompt - hit, inst.hardware)
        out.append(ScoredInstance(inst, hit, inst.expected_wait_s, prefill_s))
    return out


def pick(scored: list[ScoredInstance], rng: random.Random, config: PolicyConfig) -> ScoredInstance:
    """The instance finishing first, a random one among those within the tie tolerance."""
    best = scored[0].finish_s
    for s in scored:
        if s.finish_s < best:
            best = s.finish_s
    tolerance = config.tie_tolerance_rel * best
    limit = best + (tolerance if tolerance > config.tie_tolerance_s else config.tie_tolerance_s)
    ties = [s for s in scored if s.finish_s <= limit]
    return ties[0] if len(ties) == 1 else ties[int(rng.random() * len(ties))]


def best_cached(scored: list[ScoredInstance]) -> int:
    """The longest prefix any scored instance reuses."""
    best = 0
    for s in scored:
        if s.cached_tokens > best:
            best = s.cached_tokens
    return best


def pick_decode(view: ClusterView, rng: random.Random) -> tuple[InstanceView, float] | None:
    """The decode instance with the most free slots (random among near-equals) and its wait for a slot."""
    pool = view.decode
    if not pool:
        return None
    most_free = max(inst.free_decode_slots for inst in pool)
    if most_free > 0:
        floor = most_free - max(1, most_free // 10)
        ties = [inst for inst in pool if inst.free_decode_slots > floor]
        return ties[int(rng.random() * len(ties))], 0.0
    least_wait = min(inst.expected_wait_s for inst in pool)
    ties = [inst for inst in pool if inst.expected_wait_s <= least_wait * 1.05 + 1e-3]
    chosen = ties[int(rng.random() * len(ties))]
    return chosen, chosen.expected_wait_s
