"""Workloads: the truncated log-normal and the empirical histogram."""

from __future__ import annotations

import numpy as np
import pytest

from libs.common.errors import BadRequest
from libs.planner.workloads import CASE_STUDY_WORKLOAD, Empirical, TruncatedLogNormal, parse_workload


def test_case_study_workload_statistics():
    """mu 9.90, sigma 1.00 in [128, 131072]: mean ~27.5K; at t=19.4K p~0.496, l_long ~45.0K, l_short ~10.2K."""
    w = CASE_STUDY_WORKLOAD
    assert w.mean_tokens == pytest.approx(27_500, rel=0.01)
    assert float(w.tail_fraction(19_400)) == pytest.approx(0.4957, abs=0.001)
    assert float(w.mean_above(19_400)) == pytest.approx(45_000, rel=0.01)
    assert float(w.mean_below(19_400)) == pytest.approx(10_200, rel=0.01)
    assert float(w.tail_fraction(w.min_tokens - 1)) == pytest.approx(1.0)
    assert float(w.tail_fraction(w.max_tokens)) == pytest.approx(0.0)


def test_samples_match_the_analytic_conditional_means():
    """Sampled lengths stay in range and reproduce p, E[L|L>t] and E[L|L<=t] within 1.5%."""
    x = CASE_STUDY_WORKLOAD.sample(np.random.default_rng(7), 400_000)
    assert x.min() >= 128 and x.max() <= 131_072
    empirical = Empirical(lengths=x)
    for t in (4_000, 19_400, 60_000):
        assert float(empirical.tail_fraction(t)) == pytest.approx(
            float(CASE_STUDY_WORKLOAD.tail_fraction(t)), rel=0.015
        )
        assert float(empirical.mean_above(t)) == pytest.approx(float(CASE_STUDY_WORKLOAD.mean_above(t)), rel=0.015)
        assert float(empirical.mean_below(t)) == pytest.approx(float(CASE_STUDY_WORKLOAD.mean_below(t)), rel=0.015)


def test_empirical_histogram_is_exact_on_its_data():
    """An empirical workload's fractions and conditional means are those of the observed lengths."""
    w = Empirical(lengths=np.array([100, 200, 300, 400]))
    assert float(w.tail_fraction(250)) == 0.5
    assert float(w.mean_above(250)) == 350
    assert float(w.mean_below(250)) == 150
    assert w.mean_tokens == 250
    assert (w.min_tokens, w.max_tokens) == (100, 400)


def test_parse_workload_specs(tmp_path):
    """lognormal:... and file:... specs parse; a malformed one is a BadRequest naming the missing or bad key."""
    w = parse_workload("lognormal:mu=9.9,sigma=1,min=128,max=131072")
    assert isinstance(w, TruncatedLogNormal) and w.mean_tokens == pytest.approx(CASE_STUDY_WORKLOAD.mean_tokens)
    path = tmp_path / "lengths.txt"
    path.write_text("10\n20\n30\n")
    assert parse_workload(f"file:{path}").mean_tokens == 20
    bad_specs = {
        "lognormal:mu=1": "missing sigma",
        "lognormal:sigma=1,min=5": "missing mu",
        "lognormal:mu=9,sigma=1,mean=3": "'mean=3' is not one of",
        "file:/nonexistent/lengths.txt": "nonexistent",
        "uniform:1,2": "expected lognormal",
        "lognormal:mu=9,sigma=-1": "sigma=-1",
    }
    for bad, message in bad_specs.items():
        with pytest.raises(BadRequest, match=message):
            parse_workload(bad)
