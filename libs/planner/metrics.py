"""Figures of a simulator run: throughput, TTFT percentiles, TPOT, offload, link use, losses."""

from __future__ import annotations

import math

import numpy as np

from libs.planner.simulator import SimRun


def _percentile(values: np.ndarray, q: float) -> float | None:
    """The q-th percentile without interpolation (None when empty or infinite)."""
    if values.size == 0:
        return None
    value = float(np.percentile(values, q, method="inverted_cdf"))
    return value if math.isfinite(value) else None


def ttfts(run: SimRun, start_s: float, end_s: float) -> np.ndarray:
    """TTFT of every request that arrived in [start_s, end_s) (inf for one that never got a token)."""
    return np.array(
        [r.ttft_s if r.first_token_s >= 0 else math.inf for r in run.requests if start_s <= r.arrival_s < end_s],
        dtype=float,
    )


def lost(run: SimRun, start_s: float = 0.0, end_s: float = math.inf) -> int:
    """Requests arriving in the window whose first token came after the timeout, or never."""
    timeout = run.spec.request_timeout_s
    return int(np.sum(ttfts(run, start_s, end_s) > timeout))


def summarize(run: SimRun) -> dict:
    """The per-configuration figures of ``prfaas sim`` over the measurement window [warmup, duration)."""
    spec = run.spec
    start, end = spec.warmup_s, spec.duration_s
    window = end - start
    arrived = [r for r in run.requests if start <= r.arrival_s < end]
    done = [r for r in run.requests if start <= r.done_s < end]
    values = ttfts(run, start, end)
    finite = values[np.isfinite(values)]
    (busy0, cap0, over0), (busy1, cap1, over1) = run.link_marks[0], run.link_marks[-1]
    return {
        "rate_rps": spec.rate_rps,
        "throughput_rps": len(done) / window,
        "ttft_mean_s": float(finite.mean()) if finite.size else None,
        "ttft_p50_s": _percentile(values, 50),
        "ttft_p90_s": _percentile(values, 90),
        "ttft_p99_s": _percentile(values, 99),
        "tpot_mean_s": float(np.mean([(r.done_s - r.admit_s) / r.output_tokens for r in done])) if done else None,
        "offload_fraction": float(np.mean([r.remote for r in arrived])) if arrived else 0.0,
        "link_utilization": (busy1 - busy0) / (cap1 - cap0) if cap1 > cap0 else 0.0,
        "link_overload_s": over1 - over0,
        "lost_requests": lost(run, start, end),
        "requests": len(arrived),
    }


def saturation_rps(run: SimRun) -> float:
    """Highest sustainable arrival rate under this routing, from an overloaded run.

    In overload every used path (remote prefill, local prefill) runs at its capacity; the system
    sustains ``min_path(completion rate of the path / share of requests routed to it)``.
    """
    spec = run.spec
    start, end = spec.warmup_s, spec.duration_s
    arrived = [r for r in run.requests if start <= r.arrival_s < end]
    done = [r for r in run.requests if start <= r.done_s < end]
    bound = math.inf
    for remote in (True, False):
        share = sum(r.remote == remote for r in arrived) / max(1, len(arrived))
        if share > 0.01:
            rate = sum(r.remote == remote for r in done) / (end - start)
            bound = min(bound, rate / share)
    return bound
