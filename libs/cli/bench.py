"""``prfaas bench NAME [ARGS]``: benchmarks that print their figures (and baselines) as text or JSON."""

from __future__ import annotations

import argparse
import importlib

# name -> module defining ``add_arguments(parser)`` and ``run(args) -> int``; imported only when run.
BENCHES = {
    "kvindex": "libs.bench.kvindex",
    "engine": "libs.bench.engine",
    "policy": "libs.bench.policy",
    "router": "libs.bench.router",
    "kv": "libs.bench.kv",
    "gateways": "libs.bench.gateways",
    "wan": "libs.bench.wan",
    "bridge": "libs.bench.bridge",
}


def add_parser(subparsers) -> None:
    """Register ``bench NAME``; each benchmark parses its own arguments (``prfaas bench NAME --help``)."""
    bench = subparsers.add_parser("bench", help="run a benchmark and print its figures")
    bench.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Import the benchmark, parse its arguments, run it."""
    module = importlib.import_module(BENCHES[args.name])
    parser = argparse.ArgumentParser(prog=f"prfaas bench {args.name}", description=(module.__doc__ or "").strip())
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    module.add_arguments(parser)
    return module.run(parser.parse_args(args.args))
