"""``prfaas bench NAME``: benchmarks that print their figures (and baselines) as text or JSON."""

from __future__ import annotations

import importlib

# name -> module defining ``add_arguments(parser)`` and ``run(args) -> int``.
BENCHES = {
    "kvindex": "libs.lab.bench_kvindex",
}


def add_parser(subparsers) -> None:
    """Register ``bench`` and one sub-command per benchmark."""
    bench = subparsers.add_parser("bench", help="run a benchmark and print its figures")
    names = bench.add_subparsers(dest="bench", required=True, metavar="NAME")
    for name, module_name in BENCHES.items():
        module = importlib.import_module(module_name)
        sub = names.add_parser(name, help=(module.__doc__ or name).strip().splitlines()[0])
        sub.add_argument("--json", action="store_true", help="print the figures as one JSON object")
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
