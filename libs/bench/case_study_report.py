"""The case study's figures: per deployment (paper units) beside the planner's, the simulator's and the paper's; table; plot.

Where the time goes is read from the router's outcome events: per route, the prefill queue, the
prefill, the exposed transfer, the first decode step, and the rest of the TTFT (router, bus, decode
reservation: ``overhead_s``); ``prefill_stretch`` is the measured prefill over the profile's time
for the same prompt (1.0: the simulated chip kept its modelled time); ``occupancy_stretch`` adds the
exposed transfer (what an instance held until its transfer was verified would lose; the gateway
computes the next prefill meanwhile, unless two jobs already hold KV there).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from libs.bench.case_study_deploy import Deployment, Scales
from libs.bench.case_study_search import Step
from libs.common.messages import OutcomeEvent
from libs.engine.profiles import HardwareProfile, ModelProfile
from libs.planner.cli_common import CONFIG_NAMES, PAPER

TOKEN_BYTES = 4  # a transfer's tokens part: the prompt's ids as int32
CPU_BOUND_CORES = 0.9  # a process using this much of a core over a step is CPU-bound there
_ERROR_CHARS = 120  # errors are counted by their first characters


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _p90(values: list[float]) -> float | None:
    return float(np.percentile(values, 90, method="inverted_cdf")) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass(frozen=True)
class Units:
    """What turns a step's live figures into the paper's: the scales, the model and each route's prefill hardware."""

    scales: Scales
    model: ModelProfile
    hardware: dict[str, HardwareProfile]  # "remote" and "local"


def step_summary(step: Step, units: Units) -> dict:
    """One step's figures (paper units), where its TTFT went, its prefill queues, the CPU each process used (cores)."""
    return {
        "kind": step.plan.kind,
        "rate_rps": step.plan.rate_rps,
        "offered_rps": step.offered_rps,
        "served_rps": step.served_rps,
        "completed_rps": step.completed_rps,
        "arrivals": step.arrivals,
        "first_tokens": step.first_tokens,
        "completions": step.completions,
        "failures": step.failures,
        "waiting_growth": step.waiting_growth,
        "kept_up": step.kept_up,
        "ttft_mean_s": _mean(step.ttfts_s),
        "ttft_p90_s": _p90(step.ttfts_s),
        "decode_mean_s": _mean(
            [units.scales.paper_s(r.done_at - r.first_at) for r in step.records if r.status == "ok" and r.first_at]
        ),
        # Tokens streamed per completed request, and what the responses' usage said (DECODE_CHUNK > 1: see the report).
        "tokens_mean": _mean([r.completion_tokens for r in step.records if r.status == "ok"]),
        "usage_tokens_mean": _mean([r.usage_tokens for r in step.records if r.status == "ok"]),
        "wall_s": step.wall_s,
        "cpu_cores": {name: cpu / step.wall_s for name, cpu in step.cpu_s.items()} if step.wall_s else {},
        "router_decision_ms": step.router_decision_ms,
        "errors": dict(Counter(r.error[:_ERROR_CHARS] for r in step.records if r.status == "error").most_common(5)),
        "breakdown": breakdown(step.outcomes, units),
        "queue": avoidable_wait(step, units.scales),
    }


def breakdown(outcomes: list[OutcomeEvent], units: Units) -> dict:
    """Per route: mean TTFT and its parts (paper s), the prefill over the profile's, and how many requests."""
    out = {}
    for route in sorted({o.route for o in outcomes}):
        group = [o for o in outcomes if o.route == route and o.ttft_s is not None and o.prefill_s is not None]
        if not group:
            continue
        scales = units.scales
        parts = {k: [scales.paper_s(getattr(o, k) or 0.0) for o in group] for k in ("queue_s", "prefill_s")}
        parts |= {k: [scales.paper_s(getattr(o, k) or 0.0) for o in group] for k in ("transfer_s", "first_step_s")}
        ttft = [scales.paper_s(o.ttft_s) for o in group]
        rest = [t - sum(p[i] for p in parts.values()) for i, t in enumerate(ttft)]
        hardware = units.hardware["remote" if route == "remote" else "local"]
        modelled = [units.model.prefill_time_s(o.prompt_tokens - o.cached_tokens, hardware) for o in group]
        out[route] = {
            "requests": len(group),
            "ttft_s": _mean(ttft),
            **{k: _mean(v) for k, v in parts.items()},
            "overhead_s": _mean(rest),
            "prefill_stretch": float(np.sum(parts["prefill_s"]) / np.sum(modelled)),
            # What one job would cost an instance held until its transfer is verified, over the model's prefill.
            "occupancy_stretch": float((np.sum(parts["prefill_s"]) + np.sum(parts["transfer_s"])) / np.sum(modelled)),
        }
    return out


def avoidable_wait(step: Step, scales: Scales) -> dict:
    """Per route, the mean prefill queue (paper s) and the part of it another instance of the pool could have saved.

    Each instance's jobs are rebuilt from the outcomes (start = sent + the queue it reported, then its
    prefill); a request's best wait is the least over its pool's instances of the work they still
    held from the requests sent before it. Least-expected-finish routing on a true view saves it all.
    """
    sent = {r.request_id: r.sent_at for r in step.records if r.request_id}
    jobs = [
        (sent[o.request_id], o.route == "remote", o.prefill_instance, o.queue_s, o.prefill_s)
        for o in step.outcomes
        if o.request_id in sent and o.queue_s is not None and o.prefill_s is not None
    ]
    jobs.sort()
    out = {}
    for remote in (True, False):
        pool = [j for j in jobs if j[1] == remote]
        if not pool:
            continue
        busy_until: dict[str, float] = {j[2]: 0.0 for j in pool}
        waits, avoidable = [], []
        for at, _, instance, queue_s, prefill_s in pool:
            best = min(max(0.0, until - at) for until in busy_until.values())
            waits.append(queue_s)
            avoidable.append(max(0.0, queue_s - best))
            busy_until[instance] = max(busy_until[instance], at + queue_s + prefill_s)
        out["remote" if remote else "local"] = {
            "queue_s": scales.paper_s(float(np.mean(waits))),
            "avoidable_s": scales.paper_s(float(np.mean(avoidable))),
        }
    return out


def config_figures(dep: Deployment, sim: dict | None, steps: dict, throughput: float | None, units: Units) -> dict:
    """One deployment's JSON figures: throughput, TTFT, offload, egress, CPU, the steps, against the model and sim."""
    light, load90, probes = steps.get("light"), steps.get("load90"), steps["probes"]
    every = [s for s in [light, *probes, load90] if s is not None]
    outcomes = [o for s in every for o in s.outcomes]
    scales = units.scales
    kept = [s for s in probes if s.kept_up and s.plan.rate_rps == throughput]
    egress = egress_gbps(kept[0], scales) if kept else None
    cpu: dict[str, float] = {}
    for s in every:
        for name, seconds in s.cpu_s.items():
            cpu[name] = cpu.get(name, 0.0) + seconds
    summaries = [step_summary(s, units) for s in every]
    busiest = max(((n, c) for x in summaries for n, c in x["cpu_cores"].items() if n != "bench"), key=lambda x: x[1])
    light_ttft = light.ttfts_s if light else []
    sim = sim or {}
    figures = {
        "policy": dep.policy,
        "threshold_tokens": dep.threshold_tokens if dep.policy == "static-threshold" else None,
        "instances": {"n_prfaas": dep.n_prfaas, "n_p": dep.n_p, "n_d": dep.n_d},
        "throughput_rps": throughput,
        "planner_lambda_max": dep.lambda_max,
        "simulator_saturation_rps": sim.get("saturation_rps"),
        "throughput_vs_planner": (throughput or 0.0) / dep.lambda_max,
        "ttft_mean_s": _mean(light_ttft),
        "ttft_p90_s": _p90(light_ttft),
        "simulator_ttft_mean_s": sim.get("ttft_mean_s"),
        "simulator_ttft_p90_s": sim.get("ttft_p90_s"),
        "ttft_mean_at_90pct_s": _mean(load90.ttfts_s) if load90 else None,
        "ttft_p90_at_90pct_s": _p90(load90.ttfts_s) if load90 else None,
        "offload_fraction": _mean([o.route == "remote" for o in outcomes]),
        "planner_offload_fraction": dep.offload_fraction,
        "egress_gbps": egress,
        "planner_egress_gbps": dep.egress_gbps,
        "cpu_seconds": cpu,
        "cpu_busiest": {"process": busiest[0], "cores": busiest[1]},
        "cpu_bound": sorted({n for x in summaries for n, c in x["cpu_cores"].items() if c >= CPU_BOUND_CORES}),
        "light": step_summary(light, units) if light else None,
        "probes": [step_summary(s, units) for s in probes],
        "load90": step_summary(load90, units) if load90 else None,
    }
    for key in ("mean", "p90"):
        value = _ratio(figures[f"ttft_{key}_s"], figures[f"simulator_ttft_{key}_s"])
        if value is not None:
            figures[f"ttft_{key}_vs_sim"] = value
    return figures


def egress_gbps(step: Step, scales: Scales) -> float | None:
    """KV egress (paper Gbps) while the step served: its first-token rate x the remote share x a remote transfer's bytes.

    Not the bytes its window's requests moved over the window: those still queued or computing when the
    step ends are closed with their transfers cut short (at a kept-up rate near saturation the last
    ~10% of the window), which read 0.84-0.89 of the planner's egress.
    """
    routed = step.outcomes
    # KV only: every transfer also carries the prompt's ids (int32), which byte_scale does not shrink.
    done = [o.bytes_moved - TOKEN_BYTES * o.prompt_tokens for o in routed if o.route == "remote" and o.ttft_s]
    if not routed or not done:
        return None
    share = sum(o.route == "remote" for o in routed) / len(routed)
    live_rps = step.first_tokens / scales.live_s(step.plan.window_s)
    return scales.paper_gbps(live_rps * share * float(np.mean(done)) * 8 / 1e9)


def ratios(configs: dict) -> dict:
    """PrfaaS-PD's throughput over each baseline's (absent when either has none)."""
    out = {}
    pd = configs.get("prfaas_pd", {}).get("throughput_rps")
    for key, name in (("ratio_vs_homogeneous", "homogeneous"), ("ratio_vs_naive", "naive_heterogeneous")):
        value = _ratio(pd, configs.get(name, {}).get("throughput_rps"))
        if value is not None:
            out[key] = value
    return out


def _cell(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(doc: dict) -> str:
    """The figures beside the planner's, the simulator's and the paper's, one column per deployment."""
    names = [n for n in CONFIG_NAMES if n in doc["configs"]]
    rows = [
        ("throughput (req/s), live", "throughput_rps", ".3f", None),
        ("  Lambda_max, planner", "planner_lambda_max", ".3f", None),
        ("  saturation, simulator", "simulator_saturation_rps", ".3f", None),
        ("  paper", None, ".2f", "lambda_max"),
        ("TTFT mean light (s), live", "ttft_mean_s", ".2f", None),
        ("  simulator", "simulator_ttft_mean_s", ".2f", None),
        ("  paper", None, ".2f", "ttft_mean_s"),
        ("TTFT P90 light (s), live", "ttft_p90_s", ".2f", None),
        ("  simulator", "simulator_ttft_p90_s", ".2f", None),
        ("  paper", None, ".2f", "ttft_p90_s"),
        ("TTFT mean at 90% (s), live", "ttft_mean_at_90pct_s", ".2f", None),
        ("  simulator", "simulator_ttft_mean_at_90pct_s", ".2f", None),
        ("TTFT P90 at 90% (s), live", "ttft_p90_at_90pct_s", ".2f", None),
        ("  simulator", "simulator_ttft_p90_at_90pct_s", ".2f", None),
        ("offload fraction, live", "offload_fraction", ".3f", None),
        ("  planner", "planner_offload_fraction", ".3f", None),
        ("egress (Gbps), live", "egress_gbps", ".1f", None),
        ("  planner", "planner_egress_gbps", ".1f", None),
    ]
    lines = [f"{'':28}" + "".join(f"{n:>22}" for n in names)]
    for label, key, spec, paper in rows:
        cells = [_cell(PAPER[n].get(paper) if paper else doc["configs"][n].get(key), spec) for n in names]
        lines.append(f"{label:28}" + "".join(f"{c:>22}" for c in cells))
    for key in ("ratio_vs_homogeneous", "ratio_vs_naive"):
        if key in doc:
            lines.append(f"{key:28}{doc[key]:>22.2f}   (paper {1.54 if 'homogeneous' in key else 1.32:.2f})")
    lines += ["", "steps (paper req/s):"]
    for n in names:
        c = doc["configs"][n]
        for s in [c["light"], *c["probes"], c["load90"]]:
            if s is None:
                continue
            verdict = "kept up" if s["kept_up"] else "FELL BEHIND"
            lines.append(
                f"  {n:20} {s['kind']:6} rate {s['rate_rps']:.3f} offered {s['offered_rps']:.3f} served "
                f"{s['served_rps']:.3f} completed {s['completed_rps']:.3f} failed {s['failures']} waiting "
                f"{s['waiting_growth']:+.1f}  {verdict}  ({s['wall_s']:.0f} s)"
            )
    lines += ["", "CPU (seconds over the deployment's steps; busiest process in cores over a step):"]
    for n in names:
        c = doc["configs"][n]
        top = sorted(c["cpu_seconds"].items(), key=lambda kv: -kv[1])[:6]
        busy = c["cpu_busiest"]
        lines.append(
            f"  {n:20} " + ", ".join(f"{k} {v:.0f}" for k, v in top) + f"; busiest {busy['process']} "
            f"{busy['cores']:.2f} cores" + (f"; CPU-bound: {', '.join(c['cpu_bound'])}" if c["cpu_bound"] else "")
        )
    for name, error in doc["failed"].items():
        lines.append(f"  {name:20} FAILED: {error.splitlines()[0]}")
    s = doc["settings"]
    lines.append(
        f"\ntime x{s['time_scale']:g}, bytes x{s['byte_scale']:g}, decode chunk {s['decode_chunk']}, link "
        f"{s['link_gbps']:g} Gbps / {s['link_rtt_ms']:g} ms live; windows {s['window_s']:g} s after "
        f"{s['warmup_s']:g} s (paper); {s['wall_s']:.0f} s in all"
    )
    return "\n".join(lines)


def plot(doc: dict, path: str) -> None:
    """Throughput (first tokens per second) against offered load for each deployment, with the planner's Lambda_max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    top = 0.0
    for i, (name, c) in enumerate(doc["configs"].items()):
        steps = sorted(
            (s for s in [c["light"], *c["probes"], c["load90"]] if s is not None), key=lambda s: s["offered_rps"]
        )
        x = [s["offered_rps"] for s in steps]
        y = [s["served_rps"] for s in steps]
        color = f"C{i}"
        ax.plot(x, y, "o-", color=color, label=f"{name} (live)")
        ax.axhline(c["planner_lambda_max"], color=color, linestyle=":", label=f"{name} Lambda_max (planner)")
        top = max(top, *x, *y, c["planner_lambda_max"])
    ax.plot([0, top * 1.1], [0, top * 1.1], color="grey", linestyle="--", linewidth=0.8, label="served = offered")
    ax.set_xlabel("offered load (req/s, paper units)")
    ax.set_ylabel("throughput: first tokens per second (req/s)")
    ax.set_title("case study on the lab: throughput vs offered load")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
