"""The ``prfaas`` command: one sub-command per area, each defined in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from libs.common.errors import PrfaasError

# Each module defines ``add_parser(subparsers)``; the parser it adds sets ``func(args) -> int``.
_COMMAND_MODULES = (
    "libs.lab.cli",
    "libs.cli.index",
    "libs.cli.bench",
    "libs.cli.decisions",
    "libs.planner.cli_plan",
    "libs.planner.cli_sim",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(prog="prfaas", description="Prefill-as-a-Service for hybrid-attention LLMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PrfaasError as e:
        print(f"prfaas: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or port the user named: one line, not a traceback
        print(f"prfaas: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
