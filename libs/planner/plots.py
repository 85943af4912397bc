"""Figures of ``prfaas plan`` and ``prfaas sim`` (matplotlib, written to a PNG file)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from libs.planner.search import PlanInputs, Result, threshold_grid
from libs.planner.throughput import bounds


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_plan(inputs: PlanInputs, best: Result, path: str) -> None:
    """The two prefill bounds and the decode bound against t (at the best N_p) and against N_p (at the best t)."""
    plt = _pyplot()
    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(12, 4.5))
    dep = best.deployment
    grid = threshold_grid(inputs.workload)
    b = bounds(dep, inputs.workload, grid)
    k = grid / 1000
    ax_t.plot(k, b["remote_bound"], label="PrfaaS bound  Θ_prfaas / p")
    ax_t.plot(k, b["local_bound"], label="PD-P bound  Θ_pdp / (1 − p)")
    ax_t.plot(k, b["theta_pdd"], "--", label="decode bound  Θ_pdd")
    ax_t.plot(k, b["lambda_max"], "k", lw=2, label="Λ_max")
    t_best = best.throughput.threshold_tokens or 0
    ax_t.axvline(t_best / 1000, color="grey", ls=":")
    ax_t.set(xscale="log", xlabel="threshold t (K tokens)", ylabel="req/s", title=f"N_p={dep.n_p}, N_d={dep.n_d}")
    ax_t.set_ylim(0, 2.5 * best.throughput.lambda_max)
    ax_t.legend(fontsize=8)

    n_ps = np.arange(0, inputs.n_pd)
    rows = [
        bounds(inputs.deployment(inputs.n_prfaas, int(n), inputs.n_pd - int(n)), inputs.workload, [t_best])
        for n in n_ps
    ]
    producers = [float(r["theta_prfaas"][0] + r["theta_pdp"][0]) for r in rows]
    consumers = [float(r["theta_pdd"][0]) for r in rows]
    lam = [float(r["lambda_max"][0]) for r in rows]
    ax_n.plot(n_ps, producers, "o-", label="producers  Θ_prfaas + Θ_pdp")
    ax_n.plot(n_ps, consumers, "s-", label="consumer  Θ_pdd")
    ax_n.plot(n_ps, lam, "k^-", lw=2, label="Λ_max")
    ax_n.axvline(dep.n_p, color="grey", ls=":")
    ax_n.set(xlabel=f"N_p (N_p + N_d = {inputs.n_pd})", ylabel="req/s", title=f"t = {t_best:,} tokens")
    ax_n.legend(fontsize=8)
    fig.suptitle(
        f"{inputs.model.name}: {inputs.n_prfaas}x{inputs.prfaas_hw.name} + {inputs.n_pd}x{inputs.pd_hw.name}, "
        f"{inputs.link_gbps:g} Gbps"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ttft(ttfts: Mapping[str, np.ndarray], path: str, title: str) -> None:
    """Empirical CDF of TTFT per configuration or policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in ttfts.items():
        if len(values):
            xs = np.sort(values)
            ax.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name)
    ax.set(xscale="log", xlabel="TTFT (s)", ylabel="fraction of requests", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_timeline(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    capacity: tuple[Sequence[float], Sequence[float]],
    path: str,
    title: str,
) -> None:
    """TTFT of each request over time per policy, above the link capacity over time."""
    plt = _pyplot()
    fig, (ax, ax_link) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name, (times, values) in series.items():
        ax.plot(times, values, ".", ms=2, alpha=0.5, label=name)
    ax.set(yscale="log", ylabel="TTFT (s)", title=title)
    ax.legend(markerscale=6)
    ax_link.step(capacity[0], capacity[1], where="post")
    ax_link.set(xlabel="time (s)", ylabel="link Gbps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
