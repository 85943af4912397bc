"""Simulator experiments: the paper's three configurations, and the link-degradation scenario."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from libs.planner.metrics import lost, saturation_rps, summarize, ttfts
from libs.planner.search import PlanInputs, Result, homogeneous, naive_heterogeneous, search_prfaas_pd
from libs.planner.sim_telemetry import TelemetrySettings
from libs.planner.simulator import SimRun, SimSpec, Simulator
from libs.policy import PolicyConfig

ProgressFactory = Callable[[str, float], Callable[[float], None] | None]
CONFIG_POLICIES = {"prfaas_pd": "static-threshold", "homogeneous": "local-only", "naive_heterogeneous": "remote-only"}
OVERLOAD_FACTOR = 1.3  # saturation runs offer this multiple of the analytic Lambda_max


def plans(inputs: PlanInputs) -> dict[str, Result]:
    """The planner's three configurations (same search as ``prfaas plan``)."""
    return {
        "prfaas_pd": search_prfaas_pd(inputs),
        "homogeneous": homogeneous(inputs),
        "naive_heterogeneous": naive_heterogeneous(inputs),
    }


def spec_for(
    inputs: PlanInputs, result: Result, policy: str, rate_rps: float, duration_s: float, seed: int, **extra
) -> SimSpec:
    """A simulator spec for one planned configuration, routed by ``policy`` with the plan's threshold."""
    dep = result.deployment
    threshold = result.throughput.threshold_tokens
    config = PolicyConfig(threshold_tokens=threshold if threshold is not None else inputs.workload.max_tokens)
    return SimSpec(
        model=inputs.model,
        prfaas_hw=inputs.prfaas_hw,
        n_prfaas=dep.n_prfaas,
        pd_hw=inputs.pd_hw,
        n_p=dep.n_p,
        n_d=dep.n_d,
        link_gbps=inputs.link_gbps,
        workload=inputs.workload,
        output_tokens=inputs.output_tokens,
        rate_rps=rate_rps,
        duration_s=duration_s,
        policy=policy,
        policy_config=config,
        warmup_s=min(300.0, duration_s / 10),
        seed=seed,
        **extra,
    )


def _run(spec: SimSpec, label: str, progress: ProgressFactory | None) -> SimRun:
    bar = progress(label, spec.duration_s) if progress else None
    run = Simulator(spec, progress=bar).run()
    if bar is not None and hasattr(bar, "close"):
        bar.close()
    return run


def case_study(
    inputs: PlanInputs,
    rate_rps: float,
    duration_s: float,
    seed: int = 0,
    progress: ProgressFactory | None = None,
    runs: dict[str, SimRun] | None = None,
    request_timeout_s: float = 60.0,
    link_sharing: str = "sender-fifo",
) -> dict:
    """Each configuration at ``rate_rps`` (TTFT, throughput ...) and overloaded (saturation)."""
    out = {}
    for name, result in plans(inputs).items():
        policy = CONFIG_POLICIES[name]
        lam = result.throughput.lambda_max
        extra = {"request_timeout_s": request_timeout_s, "link_sharing": link_sharing}
        spec = spec_for(inputs, result, policy, rate_rps, duration_s, seed, **extra)
        run = _run(spec, f"{name} @ {rate_rps:g} req/s", progress)
        if runs is not None:
            runs[name] = run
        overload = spec_for(inputs, result, policy, OVERLOAD_FACTOR * lam, duration_s, seed + 1, drain=False, **extra)
        saturation = saturation_rps(_run(overload, f"{name} saturation", progress))
        figures = summarize(run)
        out[name] = {
            "policy": policy,
            "saturation_rps": saturation,
            "lambda_max": lam,
            "saturation_vs_lambda_max": saturation / lam - 1,
            **figures,
        }
    return out


@dataclass(frozen=True)
class Degradation:
    """The link-degradation scenario: the link drops to ``degraded_gbps`` in [start_s, end_s)."""

    rate_rps: float = 2.7  # 83% of the case study's Lambda_max: a busy, stable deployment
    duration_s: float = 1800.0
    start_s: float = 600.0
    end_s: float = 1200.0
    degraded_gbps: float = 10.0
    replan_interval_s: float = 60.0  # slow timescale of the "+slow" variants
    request_timeout_s: float = 60.0  # a request without its first token by then is lost
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    link_sharing: str = "sender-fifo"  # how concurrent transfers share the link (libs.planner.link.SHARING)
    seed: int = 0

    def to_json(self) -> dict:
        """The settings, for the scenario's JSON."""
        return asdict(self)


def link_degradation(
    inputs: PlanInputs,
    scenario: Degradation,
    progress: ProgressFactory | None = None,
    runs: dict[str, SimRun] | None = None,
) -> dict:
    """Static threshold vs adaptive vs cost-model through a link degradation.

    ``adaptive`` and ``cost-model`` are the fast timescale only (routing); the ``+slow`` variants
    also re-plan t and N_p/N_d every ``replan_interval_s`` from the measured goodput (the paper's
    slow timescale), converting local instances between prefill and decode.
    """
    plan = search_prfaas_pd(inputs)
    schedule = ((scenario.start_s, scenario.degraded_gbps), (scenario.end_s, inputs.link_gbps))
    variants = {
        "static-threshold": ("static-threshold", None),
        "adaptive": ("adaptive", None),
        "cost-model": ("cost-model", None),
        "adaptive+slow": ("adaptive", scenario.replan_interval_s),
        "cost-model+slow": ("cost-model", scenario.replan_interval_s),
    }
    out = {}
    for name, (policy, replan) in variants.items():
        spec = spec_for(
            inputs,
            plan,
            policy,
            scenario.rate_rps,
            scenario.duration_s,
            scenario.seed,
            link_schedule=schedule,
            replan_interval_s=replan,
            request_timeout_s=scenario.request_timeout_s,
            telemetry=scenario.telemetry,
            link_sharing=scenario.link_sharing,
        )
        run = _run(spec, name, progress)
        if runs is not None:
            runs[name] = run
        degraded = ttfts(run, scenario.start_s, scenario.end_s)
        figures = summarize(run)
        out[name] = {
            "policy": policy,
            "slow_timescale": replan is not None,
            "throughput_rps": figures["throughput_rps"],
            "ttft_p90_degraded_s": float(np.percentile(degraded, 90)) if np.all(np.isfinite(degraded)) else None,
            "ttft_mean_degraded_s": float(np.mean(degraded[np.isfinite(degraded)])),
            "ttft_p90_s": figures["ttft_p90_s"],
            "lost_requests": lost(run),
            "link_overload_s": figures["link_overload_s"],
            "offload_fraction_degraded": float(
                np.mean([r.remote for r in run.requests if scenario.start_s <= r.arrival_s < scenario.end_s])
            ),
            "role_changes": [{"time_s": t, "threshold_tokens": th, "n_p": n} for t, th, n in run.role_changes],
        }
    static = out["static-threshold"]["ttft_p90_degraded_s"]
    for figures in out.values():
        mine = figures["ttft_p90_degraded_s"]
        figures["p90_degraded_vs_static"] = mine / static if mine is not None and static else None
    return out
