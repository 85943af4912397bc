"""``prfaas plan``: the paper's throughput model and configuration search, as a table or JSON."""

from __future__ import annotations

import argparse
import json

from libs.planner.cli_common import (
    CONFIG_NAMES,
    PAPER,
    PAPER_COST_NORMALIZED_GAIN,
    add_deployment_arguments,
    check_plot_path,
    describe_inputs,
    describe_workload,
    inputs_from_args,
    is_paper_case_study,
)
from libs.planner.search import PlanInputs, Result, homogeneous, naive_heterogeneous, search_prfaas_pd


def add_parser(subparsers) -> None:
    """Register ``plan``."""
    parser = subparsers.add_parser(
        "plan",
        help="recommend the threshold t and the N_p/N_d split (the paper's throughput model)",
        description="Grid-search t and N_p for PrfaaS-PD and compare with the homogeneous and naive baselines.",
    )
    add_deployment_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="write the throughput bounds against t and N_p (.png, .pdf or .svg)"
    )
    parser.add_argument("--cost-normalized", action="store_true", help="also report the gain at equal hardware cost")
    parser.set_defaults(func=run)


def plan(inputs: PlanInputs) -> dict[str, Result]:
    """The best PrfaaS-PD configuration and the two baselines."""
    return {
        "prfaas_pd": search_prfaas_pd(inputs),
        "homogeneous": homogeneous(inputs),
        "naive_heterogeneous": naive_heterogeneous(inputs),
    }


def report(inputs: PlanInputs, results: dict[str, Result], cost_normalized: bool) -> dict:
    """The JSON document of ``prfaas plan``."""
    base = results["homogeneous"].throughput.lambda_max
    out: dict = {name: results[name].throughput.to_json() for name in CONFIG_NAMES}
    out["ratios"] = {name: results[name].throughput.lambda_max / base for name in CONFIG_NAMES}
    if cost_normalized:
        base_per_dollar = base / results["homogeneous"].deployment.price_per_hour
        out["cost_normalized"] = {
            name: {
                "price_per_hour": results[name].deployment.price_per_hour,
                "gpus": results[name].deployment.gpus,
                "rps_per_dollar_hour": results[name].throughput.lambda_max / results[name].deployment.price_per_hour,
                "gain_vs_homogeneous": results[name].throughput.lambda_max
                / results[name].deployment.price_per_hour
                / base_per_dollar,
            }
            for name in CONFIG_NAMES
        }
    out["inputs"] = describe_inputs(inputs)
    return out


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _table(doc: dict, case_study: bool) -> str:
    rows = [
        ("threshold t (tokens)", "threshold_tokens", ",.0f"),
        ("offloaded fraction", "offload_fraction", ".3f"),
        ("N_prfaas", "n_prfaas", "d"),
        ("N_p", "n_p", "d"),
        ("N_d", "n_d", "d"),
        ("Theta_prfaas (req/s)", "theta_prfaas", ".2f"),
        ("Theta_pdp (req/s)", "theta_pdp", ".2f"),
        ("Theta_pdd (req/s)", "theta_pdd", ".2f"),
        ("Lambda_max (req/s)", "lambda_max", ".3f"),
        ("PrfaaS egress (Gbps)", "egress_gbps", ".1f"),
    ]
    head = f"{'':24}" + "".join(f"{name:>22}" for name in CONFIG_NAMES)
    lines = [head]
    for label, key, spec in rows:
        lines.append(f"{label:24}" + "".join(f"{_fmt(doc[name][key], spec):>22}" for name in CONFIG_NAMES))
    lines.append(f"{'ratio vs homogeneous':24}" + "".join(f"{doc['ratios'][n]:>21.2f}x" for n in CONFIG_NAMES))
    if case_study:
        paper = [
            ("paper Lambda_max", "lambda_max", ".2f"),
            ("paper t", "threshold_tokens", ",.0f"),
            ("paper ratio", "ratio", ".2f"),
        ]
        for label, key, spec in paper:
            lines.append(f"{label:24}" + "".join(f"{_fmt(PAPER[n].get(key), spec):>22}" for n in CONFIG_NAMES))
    if "cost_normalized" in doc:
        cost = doc["cost_normalized"]
        lines.append(f"{'price (USD/h)':24}" + "".join(f"{cost[n]['price_per_hour']:>22,.0f}" for n in CONFIG_NAMES))
        lines.append(
            f"{'req/s per USD/h (x1000)':24}"
            + "".join(f"{cost[n]['rps_per_dollar_hour'] * 1000:>22.2f}" for n in CONFIG_NAMES)
        )
        lines.append(
            f"{'gain at equal cost':24}" + "".join(f"{cost[n]['gain_vs_homogeneous']:>21.2f}x" for n in CONFIG_NAMES)
        )
        if case_study:
            lines.append(f"{'paper gain at equal cost':24}{PAPER_COST_NORMALIZED_GAIN:>43.2f}x")
    inputs = doc["inputs"]
    lines.append(
        f"\n{inputs['model']}: {inputs['n_prfaas']}x{inputs['prfaas_hw']} (PrfaaS) + {inputs['n_pd']}x{inputs['pd_hw']} "
        f"(PD), link {inputs['link_gbps']:g} Gbps, {inputs['output_tokens']:,} output tokens, workload "
        f"{describe_workload(inputs['workload'])}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the search and print the table or JSON."""
    check_plot_path(args.plot)
    inputs = inputs_from_args(args)
    results = plan(inputs)
    doc = report(inputs, results, args.cost_normalized)
    if args.plot:
        from libs.planner.plots import plot_plan

        plot_plan(inputs, results["prfaas_pd"], args.plot)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(_table(doc, is_paper_case_study(args, inputs)))
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0
