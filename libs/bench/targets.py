"""Figure, target, met or missed: the one verdict every ``prfaas bench`` prints and exits by.

A :class:`Target` bounds one figure of a benchmark's JSON, named by its dotted path
(``decision_32k.vs_floor``). :func:`conclude` judges a run's figures against the benchmark's
targets, adds the verdicts to the figures, prints them (the JSON, or the benchmark's text, then
one line per target saying met or MISSED) and returns the exit status: 1 if a binding target was
missed. ``--target FIGURE=BOUND`` (``prfaas bench``) replaces a bound for one run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from libs.common.errors import ConfigError, PrfaasError


@dataclass(frozen=True)
class Target:
    """A bound on one figure: ``at_least <= figure <= at_most`` (either side may be open)."""

    figure: str  # dotted path into the benchmark's JSON figures
    at_most: float | None = None
    at_least: float | None = None
    unit: str = ""
    binding: bool = True  # False: printed for information, never a miss
    optional: bool = False  # judged only when the run produced the figure (a mode of the benchmark)
    must_be_true: bool = False  # a yes/no figure (``tokens_identical``): met when true

    @classmethod
    def true(cls, figure: str) -> Target:
        """A yes/no figure that must be true."""
        return cls(figure, at_least=1.0, must_be_true=True)

    def met(self, value: float) -> bool:
        """Whether ``value`` is within the bound (NaN never is)."""
        if math.isnan(value):
            return False
        return (self.at_most is None or value <= self.at_most) and (self.at_least is None or value >= self.at_least)

    def bound(self) -> str:
        """The bound as people write it: ``<= 5 ms``, ``>= 0.95``, ``0.9 .. 1.05``, ``true``."""
        if self.must_be_true:
            return "true"
        if self.at_most is not None and self.at_least is not None:
            return f"{self.at_least:g} .. {self.at_most:g}{self.unit}"
        if self.at_most is not None:
            return f"<= {self.at_most:g}{self.unit}"
        return f">= {self.at_least:g}{self.unit}"

    def describe(self) -> str:
        """``figure <= bound`` for help texts."""
        return self.figure if self.must_be_true else f"{self.figure} {self.bound()}"

    def with_bound(self, text: str) -> Target:
        """This target with the bound of ``--target FIGURE=TEXT``: a number, or ``LOW..HIGH`` (ConfigError otherwise)."""
        flag = f"--target {self.figure}={text}"
        if self.must_be_true:
            raise ConfigError(f"{flag}: {self.figure} must be true; it has no bound to change")
        try:
            if ".." in text:
                low, high = (float(x) for x in text.split("..", 1))
                return replace(self, at_least=low, at_most=high, binding=True)
            value = float(text)
        except ValueError:
            raise ConfigError(f"{flag}: expected a number or LOW..HIGH") from None
        if self.at_most is not None and self.at_least is not None:
            raise ConfigError(f"{flag}: {self.figure} is bounded on both sides; give LOW..HIGH")
        side = "at_most" if self.at_most is not None else "at_least"
        return replace(self, binding=True, **{side: value})


def _number(value: float) -> str:
    """``88,771`` for large figures, four significant digits otherwise."""
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"


@dataclass(frozen=True)
class Verdict:
    """One target judged on one run."""

    target: Target
    value: float

    @property
    def met(self) -> bool:
        """The figure is within its target."""
        return self.target.met(self.value)

    @property
    def missed(self) -> bool:
        """A binding target the figure is outside of."""
        return self.target.binding and not self.met

    def line(self) -> str:
        """``figure  value  target <= bound  met|MISSED`` (``info`` for a non-binding target)."""
        t = self.target
        shown = ("true" if self.value else "false") if t.must_be_true else f"{_number(self.value)}{t.unit}"
        verdict = "met" if self.met else "MISSED" if t.binding else "not met (information)"
        return f"{'target' if t.binding else 'info'}  {t.figure:40s} {shown:>14}  (target {t.bound()})  {verdict}"

    def as_json(self) -> dict:
        """The verdict as a JSON object."""
        t = self.target
        return {"figure": t.figure, "value": self.value, "target": t.bound(), "binding": t.binding, "met": self.met}


@dataclass(frozen=True)
class Benchmark:
    """One ``prfaas bench NAME``: its module, what it measures (one line) and its targets."""

    module: str
    measures: str
    targets: tuple[Target, ...]

    def targets_text(self) -> str:
        """The binding targets, ``; ``-separated."""
        return "; ".join(t.describe() for t in self.targets if t.binding)

    def help_line(self) -> str:
        """What it measures and its binding targets, for ``prfaas bench --help``."""
        return f"{self.measures}. Targets: {self.targets_text()}"

    def with_overrides(self, items: Iterable[str]) -> tuple[Target, ...]:
        """The targets with ``FIGURE=BOUND`` overrides applied (ConfigError naming an unknown figure)."""
        targets = {t.figure: t for t in self.targets}
        for item in items:
            figure, sep, bound = item.partition("=")
            if not sep or figure not in targets:
                known = ", ".join(targets)
                raise ConfigError(f"--target {item!r}: expected FIGURE=BOUND with FIGURE one of {known}")
            targets[figure] = targets[figure].with_bound(bound)
        return tuple(targets.values())


def figure_value(figures: Mapping, path: str) -> float | None:
    """The number at ``path`` (dotted) in ``figures``; None if absent."""
    node: object = figures
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    if isinstance(node, bool | int | float):
        return float(node)
    raise PrfaasError(f"figure {path} is not a number: {node!r}")


def judge(targets: Iterable[Target], figures: Mapping) -> list[Verdict]:
    """Each target's verdict on ``figures`` (an optional target whose figure is absent is skipped)."""
    verdicts = []
    for target in targets:
        value = figure_value(figures, target.figure)
        if value is None:
            if target.optional:
                continue
            raise PrfaasError(f"the run produced no figure {target.figure}")
        verdicts.append(Verdict(target, value))
    return verdicts


def add_target_argument(parser: argparse.ArgumentParser) -> None:
    """``--target FIGURE=BOUND`` (repeatable), shared by every benchmark."""
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="FIGURE=BOUND",
        help="replace a target's bound for this run (a number, or LOW..HIGH); repeatable",
    )


def conclude(args: argparse.Namespace, figures: dict, text: str = "") -> int:
    """Judge ``figures`` against ``args.targets``, print them with the verdicts, return the exit status.

    With ``args.json`` the figures (with ``verdicts`` and ``missed``) are one JSON object on stdout
    and the verdict lines go to stderr; otherwise ``text`` and the verdict lines go to stdout.
    """
    verdicts = judge(args.targets, figures)
    figures["verdicts"] = [v.as_json() for v in verdicts]
    figures["missed"] = [v.target.figure for v in verdicts if v.missed]
    lines = [v.line() for v in verdicts]
    summary = f"missed: {', '.join(figures['missed'])}" if figures["missed"] else "every target met"
    if args.json:
        print(json.dumps(figures, indent=2))
        print("\n".join([*lines, summary]), file=sys.stderr)
    else:
        print("\n".join([*([text] if text else []), *lines, summary]))
    return 1 if figures["missed"] else 0
