"""Every ``prfaas bench`` judges its figures against its targets, says met or missed, and exits 1 on a miss."""

from __future__ import annotations

import json

import pytest

from libs.bench.catalog import BENCHMARKS
from libs.bench.targets import Target, judge
from libs.cli import main


def test_a_target_is_met_within_its_bound_and_missed_outside() -> None:
    """Upper, lower and two-sided bounds; NaN is never within; a yes/no figure must be true."""
    assert Target("x", at_most=5).met(5) and not Target("x", at_most=5).met(5.01)
    assert Target("x", at_least=0.95).met(0.95) and not Target("x", at_least=0.95).met(0.9)
    both = Target("x", at_least=0.9, at_most=1.1)
    assert both.met(1.0) and not both.met(0.89) and not both.met(1.11) and not both.met(float("nan"))
    assert Target.true("same").met(True) and not Target.true("same").met(False)


def test_judge_reads_dotted_figures_and_skips_only_optional_absent_ones() -> None:
    """A target names a figure by its dotted path; an absent figure is an error unless the target is optional."""
    figures = {"case": {"p50_ms": 7.0}, "same": True}
    verdicts = judge(
        [Target("case.p50_ms", at_most=5), Target.true("same"), Target("other", at_most=1, optional=True)], figures
    )
    assert [(v.target.figure, v.met, v.missed) for v in verdicts] == [
        ("case.p50_ms", False, True),
        ("same", True, False),
    ]
    assert "MISSED" in verdicts[0].line() and verdicts[1].line().endswith("met")
    with pytest.raises(Exception, match="no figure other"):
        judge([Target("other", at_most=1)], figures)


def test_information_is_printed_but_never_a_miss() -> None:
    """A non-binding target outside its bound says so and does not count as missed."""
    [verdict] = judge([Target("p50_ms", at_most=2, binding=False)], {"p50_ms": 3.0})
    assert not verdict.met and not verdict.missed and "information" in verdict.line()


def test_overrides_replace_a_bound_and_refuse_unknown_figures() -> None:
    """``--target FIGURE=BOUND`` changes one target for one run; an unknown figure or a bad bound is a ConfigError."""
    gateways = BENCHMARKS["gateways"]
    targets = {
        t.figure: t
        for t in gateways.with_overrides(["overhead_p50_ms=0.5", "pipelining.receiver_vs_budget.median=0.5..2"])
    }
    assert targets["overhead_p50_ms"].at_most == 0.5
    assert (
        targets["pipelining.receiver_vs_budget.median"].at_least,
        targets["pipelining.receiver_vs_budget.median"].at_most,
    ) == (0.5, 2)
    for bad in ("nothing=1", "overhead_p50_ms=fast", "pipelining.receiver_vs_budget.median=1", "tokens_identical=0"):
        with pytest.raises(Exception, match="--target"):
            gateways.with_overrides([bad])


def test_bench_help_describes_every_benchmark_with_its_targets(capsys) -> None:
    """``prfaas bench --help`` has one entry per benchmark: what it measures and its binding targets."""
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, benchmark in BENCHMARKS.items():
        assert f"{name}: {benchmark.measures}" in text
        for target in benchmark.targets:
            assert (target.describe() in text) == target.binding, target


def test_a_missed_target_is_printed_and_exits_1(capsys) -> None:
    """An impossible target (a 1 ns policy decision): exit 1, the figure named MISSED, the JSON says so."""
    assert main(["bench", "policy", "--decisions", "300", "--json", "--target", "decision_p50_us=0.001"]) == 1
    out, err = capsys.readouterr()
    figures = json.loads(out)
    assert figures["missed"] == ["decision_p50_us"] and figures["verdicts"][0]["met"] is False
    assert "decision_p50_us" in err and "MISSED" in err


def test_a_met_target_exits_0_and_says_met(capsys) -> None:
    """A policy decision within 5 ms (a loaded 2-core machine measures 30-60 us): exit 0, the figure "met"."""
    assert main(["bench", "policy", "--decisions", "300", "--target", "decision_p50_us=5000"]) == 0
    out = capsys.readouterr().out
    assert "decision_p50_us" in out and out.rstrip().endswith("every target met")


def test_an_unknown_target_is_a_one_line_error_before_any_work(capsys) -> None:
    """``--target`` naming no figure of the benchmark: exit 2, one line naming the known figures."""
    assert main(["bench", "router", "--target", "latency=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "decision_32k.vs_floor" in err
