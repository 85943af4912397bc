"""The link-degradation scenario: adaptive and cost-model protect TTFT where the static threshold does not."""

from __future__ import annotations

import pytest

from libs.engine.profiles import HARDWARE, MODELS
from libs.planner.scenarios import Degradation, link_degradation
from libs.planner.search import PlanInputs
from libs.planner.workloads import CASE_STUDY_WORKLOAD

INPUTS = PlanInputs(MODELS["kimi-linear-1t"], HARDWARE["h200"], 4, HARDWARE["h20"], 8, 100.0, CASE_STUDY_WORKLOAD, 1024)


@pytest.fixture(scope="module")
def scenario() -> dict:
    """The default scenario: 100 -> 10 Gbps for the middle 10 of 30 minutes at 2.7 req/s."""
    return link_degradation(INPUTS, Degradation())


@pytest.mark.parametrize("name", ["adaptive", "cost-model", "adaptive+slow", "cost-model+slow"])
def test_p90_ttft_while_degraded_is_at_most_0_7_of_static(scenario, name):
    """Adaptive and cost-model (with and without the slow timescale) keep degraded P90 TTFT <= 0.7x static."""
    assert scenario[name]["p90_degraded_vs_static"] <= 0.7
    assert scenario[name]["lost_requests"] == 0


def test_static_threshold_overloads_the_degraded_link(scenario):
    """The static threshold keeps offloading half the requests into the 10 Gbps link and saturates it."""
    static = scenario["static-threshold"]
    assert static["offload_fraction_degraded"] == pytest.approx(0.5, abs=0.05)
    assert static["link_overload_s"] >= max(scenario[n]["link_overload_s"] for n in ("adaptive", "adaptive+slow"))
    assert static["ttft_p90_degraded_s"] > 10.0


def test_slow_timescale_converts_roles_and_converts_back(scenario):
    """The re-planner moves a decode instance to prefill during the degradation and back after it."""
    changes = scenario["cost-model+slow"]["role_changes"]
    during = [c for c in changes if 600 <= c["time_s"] < 1200]
    after = [c for c in changes if c["time_s"] >= 1200]
    assert during and max(c["n_p"] for c in during) == 4
    assert after and after[-1]["n_p"] == 3


def test_every_policy_keeps_up_with_the_offered_rate(scenario):
    """Over the whole run every policy completes about the offered 2.7 req/s."""
    for figures in scenario.values():
        assert figures["throughput_rps"] == pytest.approx(2.7, rel=0.05)


def test_seed_1_loses_nothing_with_transfers_paced_oldest_first():
    """Seed 1, where equal sharing of the link costs adaptive one 128K prompt: paced oldest first (as kvwire does), none."""
    figures = link_degradation(INPUTS, Degradation(seed=1))
    assert {name: f["lost_requests"] for name, f in figures.items()} == dict.fromkeys(figures, 0)
    for name in ("adaptive", "cost-model"):
        assert figures[name]["p90_degraded_vs_static"] <= 0.7
