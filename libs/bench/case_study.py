"""The paper's case study on the running services: each planned deployment on the lab, its throughput and TTFT.

For each configuration ``prfaas plan --case-study`` chose (PrfaaS-PD, homogeneous PD, naive
heterogeneous; ``libs/bench/case_study_deploy.py``), one after another: start its lab with
simulated chips (time x ``--scale``, bytes x ``--byte-scale``, the relay's link scaled to match),
drive it through the router's OpenAI API with the case-study workload (``case_study_load.py``):

1. light load: ``--light-requests`` at 1 req/s (the simulator's TTFT rate): TTFT mean and P90;
2. the throughput search (``case_study_search.py``): ``--probes`` steps from the planner's
   Lambda_max, each a warm-up then a ``--duration`` window; the highest rate that kept up;
3. 90% of that rate: TTFT mean and P90 under load.

Every figure is in the paper's units (rates x scale, times / scale), beside the planner's Lambda_max,
the simulator's saturation and light-load TTFT (``prfaas sim --case-study``, one simulated hour)
and the paper's (``case_study_report.py``), with every process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from libs.bench import case_study_args
from libs.bench.case_study_deploy import Deployment, Scales, deployments, running, topology
from libs.bench.case_study_load import Driver, PromptBank
from libs.bench.case_study_report import Units, config_figures, plot, ratios, table
from libs.bench.case_study_search import SearchPlan, StepContext, StepPlan, Watch, run_step, search
from libs.bench.targets import conclude
from libs.common.bus import connect
from libs.common.errors import BadRequest, PrfaasError
from libs.planner.cli_common import CONFIG_NAMES, check_plot_path, inputs_from_args
from libs.planner.cli_sim import DEFAULT_RATE_RPS
from libs.planner.metrics import summarize
from libs.planner.scenarios import CONFIG_POLICIES, case_study, plans, spec_for
from libs.planner.search import PlanInputs
from libs.planner.simulator import Simulator

LOAD90 = 0.9
SIM_DURATION_S = 3600.0
_LIGHT_WARMUP_S = 30.0  # paper seconds before the light-load window: decode batches fill as in a steady state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags (``case_study_args``: the lab verb defines the same ones without importing this module)."""
    case_study_args.add_arguments(parser)


def _inputs() -> PlanInputs:
    keys = ("model", "prfaas_hw", "n_prfaas", "pd_hw", "n_pd", "link_gbps", "workload", "output_tokens")
    return inputs_from_args(argparse.Namespace(case_study=True, **dict.fromkeys(keys)))


def _check(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIG_NAMES]
    if unknown or not names:
        raise BadRequest(f"--configs: expected names among {', '.join(CONFIG_NAMES)}, got {args.configs!r}")
    positive = ("scale", "byte_scale", "duration", "warmup", "probes", "decode_chunk")
    bad = [f"--{k.replace('_', '-')}" for k in positive if getattr(args, k) <= 0]
    if bad or args.light_requests < 0 or (args.first_rps is not None and args.first_rps <= 0):
        raise BadRequest(f"{', '.join(bad) or '--light-requests / --first-rps'} must be positive")
    check_plot_path(args.plot)
    return names


def run(args: argparse.Namespace) -> int:
    """Run the deployments, print the figures with their targets; exit 1 on a miss."""
    names = _check(args)
    scales = Scales(args.scale, args.byte_scale, args.decode_chunk)
    inputs = _inputs()
    started = time.monotonic()
    print("simulating the planned configurations ...", file=sys.stderr, flush=True)
    sim = case_study(inputs, DEFAULT_RATE_RPS, SIM_DURATION_S, args.seed)
    configs, failed = {}, {}
    for dep in [d for d in deployments(inputs) if d.name in names]:
        print(f"{dep.name}: starting its lab ...", file=sys.stderr, flush=True)
        try:
            configs[dep.name] = asyncio.run(_deployment(dep, inputs, scales, args, sim[dep.name]))
        except PrfaasError as e:  # the lab did not start or stopped answering: the others still run
            failed[dep.name] = str(e)
            print(f"{dep.name}: failed: {e}", file=sys.stderr, flush=True)
    link = topology(deployments(inputs)[0], inputs, scales).links[0]
    doc = {
        "configs": configs,
        **ratios(configs),
        "failed": failed,
        "deployments_failed": len(failed),
        "settings": {
            "time_scale": scales.time_scale,
            "byte_scale": scales.byte_scale,
            "decode_chunk": scales.decode_chunk,
            "link_gbps": link.gbps,
            "link_rtt_ms": link.rtt_ms,
            "warmup_s": args.warmup,
            "window_s": args.duration,
            "light_rps": DEFAULT_RATE_RPS,
            "light_requests": args.light_requests,
            "probes": args.probes,
            "seed": args.seed,
            "simulator": {"rate_rps": DEFAULT_RATE_RPS, "duration_s": SIM_DURATION_S, "seed": args.seed},
            "wall_s": time.monotonic() - started,
        },
    }
    if args.plot:
        plot(doc, args.plot)
    return conclude(args, doc, table(doc))


async def _deployment(dep: Deployment, inputs: PlanInputs, scales: Scales, args, sim: dict) -> dict:
    """Start one deployment's lab, run its steps, stop it; its figures."""
    topo = topology(dep, inputs, scales)
    instances = dep.n_prfaas + dep.n_p + dep.n_d
    bank = PromptBank(inputs.model.name, inputs.workload.max_tokens, inputs.output_tokens, topo.block_size, args.seed)
    async with running(topo) as lab:
        nc = await connect(lab.nats_url, name="case-study")
        try:
            watch = Watch(nc)
            await watch.start()
            async with Driver(lab.router_url, bank) as driver:
                context = inputs.model.max_prompt_tokens - inputs.output_tokens
                ctx = StepContext(lab, driver, watch, scales, instances, context)
                steps = await _steps(ctx, dep, args)
        finally:
            await nc.close()
    hardware = {"remote": inputs.prfaas_hw, "local": inputs.pd_hw}
    figures = config_figures(dep, sim, steps, steps["throughput"], Units(scales, inputs.model, hardware))
    load90 = steps.get("load90")
    if load90:
        at90 = simulate(inputs, dep.name, load90.plan.rate_rps, args.seed)
        figures |= {
            "simulator_ttft_mean_at_90pct_s": at90["ttft_mean_s"],
            "simulator_ttft_p90_at_90pct_s": at90["ttft_p90_s"],
        }
    return figures


def simulate(inputs: PlanInputs, name: str, rate_rps: float, seed: int) -> dict:
    """The simulator's figures for deployment ``name`` at ``rate_rps`` (one simulated hour, as ``prfaas sim``)."""
    spec = spec_for(inputs, plans(inputs)[name], CONFIG_POLICIES[name], rate_rps, SIM_DURATION_S, seed)
    return summarize(Simulator(spec).run())


async def _steps(ctx: StepContext, dep: Deployment, args) -> dict:
    """Light load, the search, 90% of what it found."""
    out: dict = {}
    if args.light_requests:
        window = args.light_requests / DEFAULT_RATE_RPS
        plan = StepPlan("light", DEFAULT_RATE_RPS, _LIGHT_WARMUP_S, window, args.seed + 100, ttft=True)
        out["light"] = await run_step(ctx, plan)
        _progress(dep, out["light"])
    first = args.first_rps or dep.lambda_max
    plan = SearchPlan(first, args.probes, args.warmup, args.duration, args.seed + 200)
    found, probes = await search(ctx, plan, lambda step: _progress(dep, step))
    out["probes"], out["throughput"] = probes, found
    if not args.no_load90:
        rate = LOAD90 * (found if found is not None else max(s.served_rps for s in probes))
        out["load90"] = await run_step(ctx, StepPlan("load90", rate, args.warmup, args.duration, args.seed + 300, True))
        _progress(dep, out["load90"])
    return out


def _progress(dep: Deployment, step) -> None:
    print(
        f"{dep.name}: {step.plan.kind} at {step.plan.rate_rps:.3f} req/s: served {step.served_rps:.3f}, "
        f"{'kept up' if step.kept_up else 'fell behind'} ({step.wall_s:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
