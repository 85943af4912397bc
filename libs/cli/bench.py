"""``prfaas bench NAME [ARGS]``: benchmarks that print their figures with their targets, met or missed."""

from __future__ import annotations

import argparse
import importlib
import textwrap

from libs.bench.catalog import BENCHMARKS
from libs.bench.targets import add_target_argument


def _catalog_text() -> str:
    """One entry per benchmark: its name, what it measures and its targets."""
    entries = [
        f"{name}:\n"
        + textwrap.fill(b.help_line(), width=100, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
        for name, b in BENCHMARKS.items()
    ]
    return "benchmarks (each exits 1 when a target is missed):\n" + "\n".join(entries)


def add_parser(subparsers) -> None:
    """Register ``bench NAME``; each benchmark parses its own arguments (``prfaas bench NAME --help``)."""
    bench = subparsers.add_parser(
        "bench",
        help="run a benchmark and print its figures, met or missed per target",
        description="Run a benchmark; it prints each figure with its target and exits 1 on "
        "a miss. `prfaas bench NAME --help` lists its flags.",
        epilog=_catalog_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("name", choices=list(BENCHMARKS), help="which benchmark")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    bench.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Import the benchmark, parse its arguments and target overrides, run it."""
    benchmark = BENCHMARKS[args.name]
    module = importlib.import_module(benchmark.module)
    parser = argparse.ArgumentParser(
        prog=f"prfaas bench {args.name}",
        description=(module.__doc__ or "").strip(),
        epilog=f"targets: {benchmark.targets_text()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object (verdicts on stderr)")
    add_target_argument(parser)
    module.add_arguments(parser)
    bench_args = parser.parse_args(args.args)
    bench_args.targets = benchmark.with_overrides(bench_args.target)
    return module.run(bench_args)
