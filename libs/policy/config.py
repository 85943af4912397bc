"""Knobs of the routing policies (one frozen object; the router fills it from its config)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.errors import ConfigError


@dataclass(frozen=True)
class PolicyConfig:
    """Thresholds and limits shared by every policy.

    ``threshold_tokens`` has no default: it depends on the deployment (model, hardware, instance
    counts, link, workload). ``libs.planner.search.planned_threshold`` derives it as ``prfaas plan``
    does (19,392 for the paper's case study).
    """

    threshold_tokens: int  # t: offload iff the uncached length exceeds it
    link_budget: float = 0.9  # cost-model: plan at most this fraction of link goodput
    scarce_utilization: float = 0.5  # adaptive: link busier than this -> bandwidth is scarce
    raise_start_utilization: float = 0.8  # adaptive: start raising t at this (smoothed) link utilisation
    raise_full_utilization: float = 1.0  # adaptive: t at its maximum at this utilisation
    backlog_limit_s: float = 5.0  # adaptive: link backlog (seconds to drain) counted as full pressure
    queue_limit_s: float = 3.5  # adaptive: remote path wait (PrfaaS queue + link delay) beyond the local wait
    # counted as full pressure (a local wait beyond the remote path's relieves it by the same measure)
    max_threshold_tokens: int = 131_072  # adaptive: the highest effective threshold
    tie_tolerance_s: float = 0.05  # instance scores this close (absolute) are ties ...
    tie_tolerance_rel: float = 0.05  # ... or this close (relative to the best)
    transport: str = "tcp"  # transport named in remote decisions
    max_candidates: int = 8  # candidates listed per decision (best first)

    def __post_init__(self) -> None:
        if self.threshold_tokens < 0:
            raise ConfigError(f"threshold_tokens must be >= 0, got {self.threshold_tokens}")
        if not 0 < self.link_budget <= 1:
            raise ConfigError(f"link_budget must be in (0, 1], got {self.link_budget}")
        if not 0 <= self.raise_start_utilization < self.raise_full_utilization:
            raise ConfigError(
                "raise_start_utilization must be >= 0 and below raise_full_utilization, got "
                f"{self.raise_start_utilization} and {self.raise_full_utilization}"
            )
        if self.max_threshold_tokens < self.threshold_tokens:
            raise ConfigError(f"max_threshold_tokens must be >= threshold_tokens, got {self.max_threshold_tokens}")
        if self.max_candidates < 1:
            raise ConfigError(f"max_candidates must be >= 1, got {self.max_candidates}")
