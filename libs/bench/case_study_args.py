"""The flags of ``prfaas lab case-study`` (and ``prfaas bench case-study``): argparse only, so ``prfaas lab`` parses fast."""

from __future__ import annotations

import argparse
import importlib

from libs.bench.targets import add_target_argument

CONFIG_NAMES = ("prfaas_pd", "homogeneous", "naive_heterogeneous")  # libs.planner.cli_common's (a test checks)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's own flags."""
    parser.add_argument("--scale", type=float, default=0.35, help="time scale of the simulated chips (default 0.35)")
    parser.add_argument(
        "--byte-scale", type=float, default=0.001, help="byte scale of the simulated chips (default 0.001)"
    )
    parser.add_argument("--decode-chunk", type=int, default=32, help="simulated decode steps per wake-up (default 32)")
    parser.add_argument(
        "--duration", type=float, default=100.0, help="window of each rate step, paper seconds (default 100)"
    )
    parser.add_argument(
        "--warmup", type=float, default=40.0, help="warm-up before each window, paper seconds (default 40)"
    )
    parser.add_argument("--probes", type=int, default=3, help="rate steps of each throughput search (default 3)")
    parser.add_argument(
        "--first-rps", type=float, help="first probe's rate, paper req/s (default: each deployment's Lambda_max)"
    )
    parser.add_argument(
        "--light-requests", type=int, default=120, help="requests of the light-load step (0: none; default 120)"
    )
    parser.add_argument("--no-load90", action="store_true", help="skip the step at 90%% of the throughput")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIG_NAMES),
        help=f"deployments to run, comma-separated (default {','.join(CONFIG_NAMES)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="arrivals and prompt lengths (default 0)")
    parser.add_argument("--plot", metavar="FILE.png", help="throughput vs offered load of every deployment")


def add_lab_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``prfaas bench case-study`` takes, for the lab verb: ``--json``, ``--target`` and the benchmark's flags."""
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object (verdicts on stderr)")
    add_target_argument(parser)
    add_arguments(parser)


def run_from_lab(args: argparse.Namespace) -> int:
    """Judge by the catalog's targets (with ``--target`` overrides) and run the benchmark."""
    catalog = importlib.import_module("libs.bench.catalog")
    args.targets = catalog.BENCHMARKS["case-study"].with_overrides(args.target)
    return importlib.import_module("libs.bench.case_study").run(args)
