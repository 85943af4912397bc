"""Arguments shared by ``prfaas plan`` and ``prfaas sim``, and the paper's case-study values."""

from __future__ import annotations

import argparse
from pathlib import Path

from libs.common.errors import BadRequest
from libs.engine.profiles import HARDWARE, MODELS, hardware_profile, model_profile
from libs.planner.search import PlanInputs
from libs.planner.workloads import CASE_STUDY_WORKLOAD, parse_workload

CONFIG_NAMES = ("prfaas_pd", "homogeneous", "naive_heterogeneous")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")

# The paper's case-study table (shared/reference/prfaas-paper.md), printed beside our figures.
PAPER = {
    "prfaas_pd": {
        "lambda_max": 3.24,
        "threshold_tokens": 19_400,
        "n_p": 3,
        "n_d": 5,
        "ratio": 1.54,
        "ttft_mean_s": 2.22,
        "ttft_p90_s": 3.51,
        "egress_gbps": 13.0,
    },
    "homogeneous": {"lambda_max": 2.11, "n_p": 9, "n_d": 3, "ratio": 1.00, "ttft_mean_s": 4.44, "ttft_p90_s": 9.73},
    "naive_heterogeneous": {"lambda_max": 2.45, "n_d": 8, "ratio": 1.16, "ttft_mean_s": 1.74, "ttft_p90_s": 3.51},
}
PAPER_COST_NORMALIZED_GAIN = 1.15


def add_deployment_arguments(parser: argparse.ArgumentParser) -> None:
    """The model/hardware/instances/link/workload flags (``--case-study`` fills them all)."""
    parser.add_argument(
        "--case-study",
        action="store_true",
        help="the paper's case study: kimi-linear-1t, 4x h200 + 8x h20, 100 Gbps, "
        "lognormal mu 9.90 sigma 1.00 in [128, 131072], 1,024 output tokens",
    )
    parser.add_argument("--model", choices=sorted(MODELS), help="model profile")
    parser.add_argument("--prfaas-hw", choices=sorted(HARDWARE), help="PrfaaS (prefill-only) hardware")
    parser.add_argument("--n-prfaas", type=int, help="PrfaaS instances")
    parser.add_argument("--pd-hw", choices=sorted(HARDWARE), help="local PD cluster hardware")
    parser.add_argument("--n-pd", type=int, help="local PD instances (N_p + N_d)")
    parser.add_argument("--link-gbps", type=float, help="inter-site link bandwidth (Gbps)")
    parser.add_argument("--workload", help="lognormal:mu=..,sigma=..,min=..,max=.. or file:lengths.txt")
    parser.add_argument("--output-tokens", type=int, help="output tokens per request")


_CASE_STUDY = {
    "model": "kimi-linear-1t",
    "prfaas_hw": "h200",
    "n_prfaas": 4,
    "pd_hw": "h20",
    "n_pd": 8,
    "link_gbps": 100.0,
    "output_tokens": 1024,
}


def inputs_from_args(args: argparse.Namespace, case_study_default: bool = False) -> PlanInputs:
    """PlanInputs from the flags; with ``--case-study`` (or ``case_study_default``) a flag given overrides the paper's value."""
    case_study = args.case_study or case_study_default
    values = {key: getattr(args, key) for key in _CASE_STUDY}
    if case_study:
        values = {key: _CASE_STUDY[key] if value is None else value for key, value in values.items()}
    missing = [f"--{key.replace('_', '-')}" for key, value in values.items() if value is None]
    if args.workload is None and not case_study:
        missing.append("--workload")
    if missing:
        raise BadRequest(f"missing {', '.join(missing)} (or use --case-study)")
    workload = CASE_STUDY_WORKLOAD if args.workload is None else parse_workload(args.workload)
    return PlanInputs(
        model=model_profile(values["model"]),
        prfaas_hw=hardware_profile(values["prfaas_hw"]),
        n_prfaas=int(values["n_prfaas"]),
        pd_hw=hardware_profile(values["pd_hw"]),
        n_pd=int(values["n_pd"]),
        link_gbps=float(values["link_gbps"]),
        workload=workload,
        output_tokens=int(values["output_tokens"]),
    )


def check_plot_path(path: str | None) -> None:
    """Refuse a ``--plot`` file that cannot be written, before any work is done."""
    if path is None:
        return
    target = Path(path)
    if target.suffix.lower() not in PLOT_SUFFIXES:
        raise BadRequest(f"--plot {path!r}: the file name must end in {', '.join(PLOT_SUFFIXES)}")
    if not target.parent.is_dir():
        raise BadRequest(f"--plot {path!r}: directory {str(target.parent)!r} does not exist")


def describe_workload(workload: dict) -> str:
    """One line for a workload's ``describe()`` dict."""
    if workload["kind"] == "lognormal":
        return (
            f"lognormal mu {workload['mu']:g} sigma {workload['sigma']:g} in [{workload['min']:,}, {workload['max']:,}]"
        )
    return (
        f"{workload['count']:,} observed lengths from {workload['source'] or 'a file'} "
        f"(mean {workload['mean']:,.0f}, in [{workload['min']:,}, {workload['max']:,}])"
    )


def describe_inputs(inputs: PlanInputs) -> dict:
    """The inputs, for JSON output."""
    return {
        "model": inputs.model.name,
        "prfaas_hw": inputs.prfaas_hw.name,
        "n_prfaas": inputs.n_prfaas,
        "pd_hw": inputs.pd_hw.name,
        "n_pd": inputs.n_pd,
        "link_gbps": inputs.link_gbps,
        "workload": inputs.workload.describe(),
        "output_tokens": inputs.output_tokens,
    }


def is_paper_case_study(args: argparse.Namespace, inputs: PlanInputs) -> bool:
    """True when the inputs are exactly the paper's case study (so its figures can be shown beside ours)."""
    if not args.case_study:
        return False
    keys = (*_CASE_STUDY, "workload")
    bare = argparse.Namespace(case_study=True, **dict.fromkeys(keys))
    return describe_inputs(inputs) == describe_inputs(inputs_from_args(bare))
