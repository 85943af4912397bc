"""The paper's throughput model (req/s) of a PrfaaS-PD deployment, vectorised over thresholds.

With ``p = P(L > t)``, ``l_long = E[L | L > t]`` and ``l_short = E[L | L <= t]``:
    Theta_prfaas = min(N_prfaas / T_prfaas(l_long), B_out / S_kv(l_long))
    Theta_pdp    = N_p / T_pd(l_short)
    Theta_pdd    = N_d * BS_max / (T_decode * L_out)
    Lambda_max   = min(Theta_prfaas / p, Theta_pdp / (1 - p), Theta_pdd)
Egress is ``Lambda_max * p * S_kv(l_long)``. All times and sizes come from libs.engine.profiles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from libs.engine.profiles import HardwareProfile, ModelProfile
from libs.planner.workloads import Workload

_INF = float("inf")


@dataclass(frozen=True)
class Deployment:
    """Hardware and instance counts of one configuration (N_p + N_d local, N_prfaas remote)."""

    model: ModelProfile
    prfaas_hw: HardwareProfile
    pd_hw: HardwareProfile
    n_prfaas: int
    n_p: int
    n_d: int
    link_gbps: float
    output_tokens: int

    @property
    def price_per_hour(self) -> float:
        """Hardware cost of the whole deployment in USD per hour."""
        return self.n_prfaas * self.prfaas_hw.price_per_hour + (self.n_p + self.n_d) * self.pd_hw.price_per_hour

    @property
    def gpus(self) -> int:
        """Number of accelerators in the deployment."""
        return self.n_prfaas * self.prfaas_hw.gpus_per_instance + (self.n_p + self.n_d) * self.pd_hw.gpus_per_instance


@dataclass(frozen=True)
class Throughput:
    """The model's figures for one deployment and threshold (JSON keys of ``prfaas plan``)."""

    threshold_tokens: int | None
    offload_fraction: float
    n_prfaas: int
    n_p: int
    n_d: int
    theta_prfaas: float | None
    theta_pdp: float | None
    theta_pdd: float
    lambda_max: float
    egress_gbps: float
    l_long_tokens: float | None  # E[L | L > t] (None: nothing is offloaded)
    l_short_tokens: float | None  # E[L | L <= t] (None: nothing stays local)

    def to_json(self) -> dict:
        """A plain dict for JSON output."""
        return asdict(self)


def _prefill_s(model: ModelProfile, tokens: np.ndarray, hw: HardwareProfile) -> np.ndarray:
    return np.vectorize(lambda n: model.prefill_time_s(float(n), hw), otypes=[float])(tokens)


def bounds(deployment: Deployment, workload: Workload, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Each throughput bound and Lambda_max for every threshold in ``thresholds`` (arrays)."""
    d = deployment
    t = np.asarray(thresholds, dtype=float)
    p = np.asarray(workload.tail_fraction(t), dtype=float)
    l_long = np.asarray(workload.mean_above(t), dtype=float)
    l_short = np.asarray(workload.mean_below(t), dtype=float)
    s_kv_bits = (d.model.linear_state_bytes + d.model.attn_kv_bytes_per_token * l_long) * 8.0
    if d.n_prfaas > 0:
        compute = d.n_prfaas / _prefill_s(d.model, l_long, d.prfaas_hw)
        theta_prfaas = np.minimum(compute, d.link_gbps * 1e9 / s_kv_bits)
    else:
        theta_prfaas = np.zeros_like(t)
    theta_pdp = d.n_p / _prefill_s(d.model, l_short, d.pd_hw) if d.n_p > 0 else np.zeros_like(t)
    theta_pdd = d.n_d * d.model.decode_rps(d.pd_hw, d.output_tokens)
    with np.errstate(divide="ignore", invalid="ignore"):
        remote_bound = np.where(p > 1e-12, theta_prfaas / p, _INF)
        local_bound = np.where(p < 1 - 1e-12, theta_pdp / (1 - p), _INF)
    lam = np.minimum(np.minimum(remote_bound, local_bound), theta_pdd)
    egress = lam * p * s_kv_bits / 1e9
    return {
        "threshold": t,
        "p": p,
        "l_long": l_long,
        "l_short": l_short,
        "theta_prfaas": theta_prfaas,
        "theta_pdp": theta_pdp,
        "theta_pdd": np.full_like(t, theta_pdd),
        "remote_bound": remote_bound,
        "local_bound": local_bound,
        "lambda_max": lam,
        "egress_gbps": egress,
    }


def at_threshold(deployment: Deployment, workload: Workload, threshold: float) -> Throughput:
    """The model's figures at one threshold."""
    b = bounds(deployment, workload, np.array([threshold]))
    d = deployment
    return Throughput(
        threshold_tokens=int(threshold),
        offload_fraction=float(b["p"][0]),
        n_prfaas=d.n_prfaas,
        n_p=d.n_p,
        n_d=d.n_d,
        theta_prfaas=float(b["theta_prfaas"][0]),
        theta_pdp=float(b["theta_pdp"][0]),
        theta_pdd=float(b["theta_pdd"][0]),
        lambda_max=float(b["lambda_max"][0]),
        egress_gbps=float(b["egress_gbps"][0]),
        l_long_tokens=float(b["l_long"][0]),
        l_short_tokens=float(b["l_short"][0]),
    )
