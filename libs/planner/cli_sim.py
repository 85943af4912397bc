"""``prfaas sim``: the discrete-event simulator on the planner's configurations and scenarios."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from libs.common.errors import BadRequest
from libs.planner.cli_common import (
    CONFIG_NAMES,
    PAPER,
    add_deployment_arguments,
    check_plot_path,
    describe_inputs,
    inputs_from_args,
    is_paper_case_study,
)
from libs.planner.link import SHARING
from libs.planner.progress import ProgressBar
from libs.planner.scenarios import Degradation, case_study, link_degradation
from libs.planner.search import search_prfaas_pd
from libs.planner.simulator import SimRun

DEFAULT_RATE_RPS = 1.0  # light load: the paper's TTFT figures are queue-free prefill + transfer times
DEFAULT_DURATION_S = 3600.0
DEFAULT_TIMEOUT_S = 60.0
DEGRADED_FRACTION = 0.1  # the scenario's link drops to this fraction of its bandwidth unless --degraded-gbps
SCENARIO_LOAD = (
    0.835  # the scenario's default rate as a fraction of the planned Lambda_max (2.7 req/s in the case study)
)
SCENARIOS = ("link-degradation",)


def add_parser(subparsers) -> None:
    """Register ``sim``."""
    parser = subparsers.add_parser(
        "sim",
        help="simulate the planned configurations (same policy code as the router)",
        description="Discrete-event simulation of PrfaaS-PD, homogeneous PD and naive heterogeneous deployments.",
    )
    add_deployment_arguments(parser)
    parser.add_argument(
        "--rate",
        type=float,
        help=f"arrival rate in req/s (default {DEFAULT_RATE_RPS:g}; for "
        f"--scenario link-degradation {SCENARIO_LOAD:g} x the planned Lambda_max)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        help=f"simulated seconds per run (default {DEFAULT_DURATION_S:g}; {Degradation.duration_s:g} for the scenario)",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        help="run a scenario instead of the three configurations "
        "(on the case study unless deployment flags say otherwise)",
    )
    parser.add_argument(
        "--degraded-gbps", type=float, help="link bandwidth while degraded (default: a tenth of --link-gbps)"
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="a request without its first token this long after arrival is lost (default %(default)g)",
    )
    parser.add_argument(
        "--link-sharing",
        choices=SHARING,
        default="sender-fifo",
        help="how concurrent KV "
        "transfers share the link: sender-fifo (default, as kvwire paces: senders share the pair's "
        "budget, each serves its transfers oldest first) or fair (equal shares per transfer, as "
        "unpaced TCP connections get)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="TTFT CDFs (configurations) or TTFT timeline (scenario); .png, .pdf or .svg"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(func=run)


def _progress(args: argparse.Namespace):
    if args.no_progress:
        return None
    return lambda label, total_s: ProgressBar(label, total_s) if total_s >= 600 else None


_SHARING_TEXT = {"fair": "fairly among transfers", "sender-fifo": "among senders, each sending its transfers in turn"}


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _case_study_table(doc: dict) -> str:
    configs = doc["configs"]
    rows = [
        ("Lambda_max (model)", "lambda_max", ".3f"),
        ("saturation (sim)", "saturation_rps", ".3f"),
        ("  sim vs model", "saturation_vs_lambda_max", "+.1%"),
        ("throughput (req/s)", "throughput_rps", ".3f"),
        ("TTFT mean (s)", "ttft_mean_s", ".2f"),
        ("TTFT P50 (s)", "ttft_p50_s", ".2f"),
        ("TTFT P90 (s)", "ttft_p90_s", ".2f"),
        ("TTFT P99 (s)", "ttft_p99_s", ".2f"),
        ("TPOT mean (ms)", "tpot_mean_s", ".1f"),
        ("offload fraction", "offload_fraction", ".3f"),
        ("link utilization", "link_utilization", ".3f"),
        ("lost requests", "lost_requests", "d"),
    ]
    lines = [f"{'':22}" + "".join(f"{n:>22}" for n in CONFIG_NAMES)]
    for label, key, spec in rows:
        cells = []
        for n in CONFIG_NAMES:
            value = configs[n][key]
            cells.append(_fmt(value * 1000 if key == "tpot_mean_s" and value is not None else value, spec))
        lines.append(f"{label:22}" + "".join(f"{c:>22}" for c in cells))
    if doc.get("paper"):
        for label, key in (("paper TTFT mean (s)", "ttft_mean_s"), ("paper TTFT P90 (s)", "ttft_p90_s")):
            lines.append(f"{label:22}" + "".join(f"{PAPER[n][key]:>22.2f}" for n in CONFIG_NAMES))
    lines.append(
        f"\nrate {doc['rate_rps']:g} req/s for {doc['duration_s']:g} simulated s per configuration; "
        f"saturation runs offer 1.3x Lambda_max; link shared {_SHARING_TEXT[doc['link_sharing']]}"
    )
    return "\n".join(lines)


def _scenario_table(doc: dict) -> str:
    rows = [
        ("throughput (req/s)", "throughput_rps", ".3f"),
        ("TTFT P90 degraded (s)", "ttft_p90_degraded_s", ".2f"),
        ("  vs static-threshold", "p90_degraded_vs_static", ".2f"),
        ("TTFT mean degraded (s)", "ttft_mean_degraded_s", ".2f"),
        ("offload while degraded", "offload_fraction_degraded", ".3f"),
        ("lost requests", "lost_requests", "d"),
        ("link overload (s)", "link_overload_s", ".0f"),
    ]
    names = list(doc["policies"])
    lines = [f"{'':24}" + "".join(f"{n:>22}" for n in names)]
    for label, key, spec in rows:
        lines.append(f"{label:24}" + "".join(f"{_fmt(doc['policies'][n][key], spec):>22}" for n in names))
    s = doc["settings"]
    lines.append(
        f"\nlink {doc['inputs']['link_gbps']:g} -> {s['degraded_gbps']:g} Gbps in [{s['start_s']:g}, {s['end_s']:g}) s "
        f"of {s['duration_s']:g} s at {s['rate_rps']:g} req/s; the +slow columns also re-plan t and N_p/N_d "
        f"every {s['replan_interval_s']:g} s"
    )
    tel = s["telemetry"]
    lines.append(
        f"policies see the link as a router does: LinkStats from each sender every {tel['interval_s']:g} s, "
        f"{tel['lag_s']:g} s late, goodput smoothed over {tel['router']['smoothing_s']:g} s; link shared "
        f"{_SHARING_TEXT[s['link_sharing']]}"
    )
    return "\n".join(lines)


def _plot(args: argparse.Namespace, doc: dict, runs: dict[str, SimRun]) -> None:
    from libs.planner.plots import plot_timeline, plot_ttft

    if args.scenario:
        series = {
            n: (
                [r.arrival_s for r in run.requests if r.first_token_s >= 0],
                [r.ttft_s for r in run.requests if r.first_token_s >= 0],
            )
            for n, run in runs.items()
        }
        s = doc["settings"]
        gbps = doc["inputs"]["link_gbps"]
        capacity = ([0, s["start_s"], s["end_s"], s["duration_s"]], [gbps, s["degraded_gbps"], gbps, gbps])
        plot_timeline(series, capacity, args.plot, "link degradation: TTFT by arrival time")
    else:
        cdfs = {n: np.array([r.ttft_s for r in run.requests if r.first_token_s >= 0]) for n, run in runs.items()}
        plot_ttft(cdfs, args.plot, f"TTFT at {doc['rate_rps']:g} req/s")


def _positive(flag: str, value: float | None, default: float) -> float:
    """``value`` if given (it must be positive), else ``default``."""
    if value is None:
        return default
    if not value > 0:
        raise BadRequest(f"{flag} must be positive, got {value:g}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the simulation(s) and print a table or JSON."""
    check_plot_path(args.plot)
    timeout_s = _positive("--timeout-s", args.timeout_s, DEFAULT_TIMEOUT_S)
    if args.seed < 0:
        raise BadRequest(f"--seed must be >= 0, got {args.seed}")
    if args.degraded_gbps is not None and args.scenario is None:
        raise BadRequest("--degraded-gbps applies to --scenario link-degradation")
    inputs = inputs_from_args(args, case_study_default=args.scenario is not None)
    runs: dict[str, SimRun] = {}
    if args.scenario == "link-degradation":
        defaults = Degradation()
        duration = _positive("--duration", args.duration, defaults.duration_s)
        degraded = _positive("--degraded-gbps", args.degraded_gbps, DEGRADED_FRACTION * inputs.link_gbps)
        if degraded >= inputs.link_gbps:
            raise BadRequest(f"--degraded-gbps must be below the link's {inputs.link_gbps:g} Gbps, got {degraded:g}")
        planned_rps = SCENARIO_LOAD * search_prfaas_pd(inputs).throughput.lambda_max
        scenario = Degradation(
            rate_rps=_positive("--rate", args.rate, round(planned_rps, 2)),
            duration_s=duration,
            start_s=duration / 3,
            end_s=2 * duration / 3,
            degraded_gbps=degraded,
            request_timeout_s=timeout_s,
            link_sharing=args.link_sharing,
            seed=args.seed,
        )
        policies = link_degradation(inputs, scenario, _progress(args), runs)
        doc = {
            "scenario": args.scenario,
            "policies": policies,
            "settings": scenario.to_json(),
            "inputs": describe_inputs(inputs),
        }
    else:
        rate = _positive("--rate", args.rate, DEFAULT_RATE_RPS)
        duration = _positive("--duration", args.duration, DEFAULT_DURATION_S)
        configs = case_study(
            inputs,
            rate,
            duration,
            args.seed,
            _progress(args),
            runs,
            request_timeout_s=timeout_s,
            link_sharing=args.link_sharing,
        )
        is_paper = is_paper_case_study(args, inputs)
        paper = {n: {k: PAPER[n][k] for k in ("ttft_mean_s", "ttft_p90_s", "lambda_max")} for n in CONFIG_NAMES}
        doc = {
            "configs": configs,
            "rate_rps": rate,
            "duration_s": duration,
            "timeout_s": timeout_s,
            "link_sharing": args.link_sharing,
            "paper": paper if is_paper else None,
            "inputs": describe_inputs(inputs),
        }
    if args.plot:
        _plot(args, doc, runs)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(_scenario_table(doc) if args.scenario else _case_study_table(doc))
        if args.plot:
            print(f"plot written to {args.plot}", file=sys.stdout)
    return 0
