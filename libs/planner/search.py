"""Configuration search: the best threshold t and local split N_p/N_d, and the two baselines.

PrfaaS-PD: a 2-D grid over t (64-token steps across the workload's range) and N_p (N_p + N_d fixed),
maximising Lambda_max; among equal Lambda_max, the point with the most prefill headroom wins (the
balance point where both prefill paths saturate together). Baselines, as in the paper:
homogeneous PD (the same number of accelerators, all of the PD kind, all prefill local) and naive
heterogeneous (every PrfaaS instance prefills, every PD instance decodes).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from libs.common.errors import BadRequest
from libs.engine.profiles import HardwareProfile, ModelProfile
from libs.planner.throughput import Deployment, Throughput, at_threshold, bounds
from libs.planner.workloads import Workload

_MAX_GRID_POINTS = 8192
_GRID_STEP_TOKENS = 64  # one KV block


@dataclass(frozen=True)
class PlanInputs:
    """What the planner is given: model, hardware, instance budget, link, workload."""

    model: ModelProfile
    prfaas_hw: HardwareProfile
    n_prfaas: int
    pd_hw: HardwareProfile
    n_pd: int
    link_gbps: float
    workload: Workload
    output_tokens: int

    def __post_init__(self) -> None:
        if self.n_prfaas < 1 or self.n_pd < 2:
            raise BadRequest(f"need n_prfaas >= 1 and n_pd >= 2, got {self.n_prfaas} and {self.n_pd}")
        if self.link_gbps <= 0 or self.output_tokens < 1:
            raise BadRequest(f"need link_gbps > 0 and output_tokens >= 1, got {self.link_gbps}, {self.output_tokens}")
        if self.model.max_batch(self.pd_hw) < 1:
            raise BadRequest(f"model {self.model.name} does not fit on one {self.pd_hw.name} instance for decode")

    def deployment(self, n_prfaas: int, n_p: int, n_d: int) -> Deployment:
        """A deployment of these inputs with the given instance counts."""
        return Deployment(
            model=self.model,
            prfaas_hw=self.prfaas_hw,
            pd_hw=self.pd_hw,
            n_prfaas=n_prfaas,
            n_p=n_p,
            n_d=n_d,
            link_gbps=self.link_gbps,
            output_tokens=self.output_tokens,
        )


@dataclass(frozen=True)
class Result:
    """One configuration: its deployment and the model's figures at its threshold."""

    deployment: Deployment
    throughput: Throughput


def threshold_grid(workload: Workload) -> np.ndarray:
    """Candidate thresholds: below the shortest request (offload all) up to the longest (offload none)."""
    lo, hi = workload.min_tokens - 1, workload.max_tokens
    step = max(_GRID_STEP_TOKENS, -(-(hi - lo) // _MAX_GRID_POINTS // _GRID_STEP_TOKENS) * _GRID_STEP_TOKENS)
    return np.unique(np.concatenate([[lo], np.arange(lo + 1, hi, step), [hi]])).astype(float)


def _best(deployment: Deployment, workload: Workload, grid: np.ndarray) -> tuple[float, float, float]:
    """(Lambda_max, prefill headroom, t) of the best threshold on ``grid``."""
    b = bounds(deployment, workload, grid)
    lam = b["lambda_max"]
    headroom = np.minimum(b["remote_bound"], b["local_bound"])
    key = np.lexsort((-headroom, -np.round(lam, 9)))[0]
    return float(lam[key]), float(headroom[key]), float(grid[key])


def search_prfaas_pd(inputs: PlanInputs) -> Result:
    """Grid search over t and N_p (N_p + N_d = n_pd) maximising Lambda_max."""
    grid = threshold_grid(inputs.workload)
    best: tuple[float, float, int, float] | None = None
    for n_p in range(0, inputs.n_pd):
        lam, headroom, t = _best(inputs.deployment(inputs.n_prfaas, n_p, inputs.n_pd - n_p), inputs.workload, grid)
        if best is None or (round(lam, 9), headroom) > (round(best[0], 9), best[1]):
            best = (lam, headroom, n_p, t)
    assert best is not None  # n_pd >= 2 guarantees one iteration
    _, _, n_p, t = best
    deployment = inputs.deployment(inputs.n_prfaas, n_p, inputs.n_pd - n_p)
    return Result(deployment, at_threshold(deployment, inputs.workload, t))


def planned_threshold(inputs: PlanInputs) -> int:
    """The threshold t ``prfaas plan`` recommends for these inputs (what a router's PolicyConfig should use)."""
    return int(search_prfaas_pd(inputs).throughput.threshold_tokens)


def homogeneous(inputs: PlanInputs) -> Result:
    """All accelerators of the PD kind (same count), all prefill local; best N_p/N_d."""
    gpus = inputs.n_prfaas * inputs.prfaas_hw.gpus_per_instance + inputs.n_pd * inputs.pd_hw.gpus_per_instance
    n = max(2, round(gpus / inputs.pd_hw.gpus_per_instance))
    t_all_local = float(inputs.workload.max_tokens)
    best: Result | None = None
    for n_p in range(1, n):
        deployment = inputs.deployment(0, n_p, n - n_p)
        result = Result(deployment, at_threshold(deployment, inputs.workload, t_all_local))
        if best is None or result.throughput.lambda_max > best.throughput.lambda_max + 1e-12:
            best = result
    assert best is not None
    return _without_threshold(best)


def naive_heterogeneous(inputs: PlanInputs) -> Result:
    """Every PrfaaS instance prefills everything; every PD instance decodes."""
    deployment = inputs.deployment(inputs.n_prfaas, 0, inputs.n_pd)
    return _without_threshold(
        Result(deployment, at_threshold(deployment, inputs.workload, inputs.workload.min_tokens - 1))
    )


def _without_threshold(result: Result) -> Result:
    """Baselines have no threshold, no unused path and no mean length on a path nothing takes: None."""
    tp = result.throughput
    return Result(
        result.deployment,
        replace(
            tp,
            threshold_tokens=None,
            theta_prfaas=tp.theta_prfaas if result.deployment.n_prfaas else None,
            theta_pdp=tp.theta_pdp if result.deployment.n_p else None,
            l_long_tokens=tp.l_long_tokens if tp.offload_fraction > 0 else None,
            l_short_tokens=tp.l_short_tokens if tp.offload_fraction < 1 else None,
        ),
    )
