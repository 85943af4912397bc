"""The ``prfaas`` command: one sub-command per area, each defined in its own module, imported only when typed."""

from __future__ import annotations

import argparse
import importlib
import sys

from libs.common.errors import PrfaasError

# command -> (module defining ``add_parser(subparsers)``, whose parser sets ``func(args) -> int``; the line
# `prfaas --help` shows). Only the typed command's module is imported, so `prfaas --help` and the light verbs
# (`lab status`, `lab down`) start without numpy, OpenTelemetry or the HTTP clients.
COMMANDS = {
    "lab": ("libs.lab.cli", "run a multi-site lab on this machine (NATS, Redis, services, WAN links)"),
    "index": ("libs.cli.index", "query the KV index"),
    "bench": ("libs.cli.bench", "run a benchmark and print its figures"),
    "decisions": ("libs.cli.decisions", "routing decision and outcome events (live or replayed)"),
    "plan": ("libs.planner.cli_plan", "recommend the threshold t and the N_p/N_d split (the paper's throughput model)"),
    "sim": ("libs.planner.cli_sim", "simulate the planned configurations (same policy code as the router)"),
}


class _Parser(argparse.ArgumentParser):
    """An argument parser that refuses what it does not know itself, so a sub-command's error shows its own usage."""

    def parse_known_args(self, args=None, namespace=None):
        """Parse, and end with this parser's usage on an unknown argument."""
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


class _Version(argparse.Action):
    """``--version``: the installed distribution's version (read only when asked)."""

    def __init__(self, option_strings: list[str], dest: str, help: str) -> None:  # noqa: A002 (argparse's word)
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib.metadata import version

        print(f"prfaas {version('prfaas')}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser, with ``command``'s arguments in full and the other commands as one help line each."""
    parser = _Parser(prog="prfaas", description="Prefill-as-a-Service for hybrid-attention LLMs.")
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_line) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_line)
    return parser


def _typed_command(argv: list[str]) -> str | None:
    """The command named in ``argv`` (the first word that is not an option), if it is one."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_typed_command(argv)).parse_args(argv)
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
