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

# One scored instance, as a plain tuple (cheap to build for every instance of a pool):
# (finish_s, queue_s, prefill_s, cached_tokens, instance); finish_s = queue_s + prefill_s.
Score = tuple[float, float, float, int, InstanceView]


class ScoredInstance:
    """The chosen prefill instance with its predicted wait, prefill time and finish for one request."""

    __slots__ = ("finish_s", "queue_s", "prefill_s", "cached_tokens", "instance")

    def __init__(self, score: Score) -> None:
        self.finish_s, self.queue_s, self.prefill_s, self.cached_tokens, self.instance = score


class PoolScores:
    """Every instance of one pool scored for one request, with the pool's best figures."""

    __slots__ = ("rows", "best_finish_s", "best_cached_tokens", "least_wait_s")

    def __init__(self, rows: list[Score], best_finish_s: float, best_cached_tokens: int, least_wait_s: float) -> None:
        self.rows = rows
        self.best_finish_s = best_finish_s
        self.best_cached_tokens = best_cached_tokens
        self.least_wait_s = least_wait_s


def score_prefill(
    view: ClusterView, pool: tuple[InstanceView, ...], request: RouteRequest, reuse_tokens: int = 0
) -> PoolScores:
    """Score every instance of ``pool``; ``reuse_tokens`` is a prefix shipped in from elsewhere."""
    model = view.model
    cached = request.cached_tokens
    prompt = request.prompt_tokens
    times: dict[tuple[str, int], float] = {}  # equal hardware and hit -> equal prefill time
    rows = []
    best_finish = best_wait = float("inf")
    best_hit = 0
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
        wait = inst.expected_wait_s
        finish = wait + prefill_s
        rows.append((finish, wait, prefill_s, hit, inst))
        if finish < best_finish:
            best_finish = finish
        if wait < best_wait:
            best_wait = wait
        if hit > best_hit:
            best_hit = hit
    return PoolScores(rows, best_finish, best_hit, best_wait)


def pick(scores: PoolScores, rng: random.Random, config: PolicyConfig) -> ScoredInstance:
    """The instance finishing first, a random one among those within the tie tolerance."""
    best = scores.best_finish_s
    tolerance = config.tie_tolerance_rel * best
    limit = best + (tolerance if tolerance > config.tie_tolerance_s else config.tie_tolerance_s)
    ties = [s for s in scores.rows if s[0] <= limit]
    return ScoredInstance(ties[0] if len(ties) == 1 else ties[int(rng.random() * len(ties))])


def pick_decode(view: ClusterView, rng: random.Random) -> tuple[InstanceView, float] | None:
    """The decode instance with the most free slots (random among near-equals) and its wait for a slot."""
    ties = view.decode_ties()
    if not ties:
        return None
    chosen = ties[int(rng.random() * len(ties))]
    return chosen, 0.0 if chosen.free_decode_slots > 0 else chosen.expected_wait_s
