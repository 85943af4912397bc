"""The simulator agrees with the analytic model and the paper, and its parts behave as modelled."""

from __future__ import annotations

import io
import json

import pytest

from libs.cli import main
from libs.engine.profiles import HARDWARE, MODELS
from libs.planner.cli_common import PAPER
from libs.planner.link import Flow, FluidLink
from libs.planner.progress import ProgressBar
from libs.planner.scenarios import case_study
from libs.planner.search import PlanInputs
from libs.planner.sim_cluster import DecodeServer, SimRequest
from libs.planner.simulator import SimSpec, Simulator
from libs.planner.workloads import CASE_STUDY_WORKLOAD, Empirical
from libs.policy import PolicyConfig

MODEL, H200, H20 = MODELS["kimi-linear-1t"], HARDWARE["h200"], HARDWARE["h20"]
INPUTS = PlanInputs(MODEL, H200, 4, H20, 8, 100.0, CASE_STUDY_WORKLOAD, 1024)


@pytest.fixture(scope="module")
def case_study_figures() -> dict:
    """Each configuration simulated for 40 minutes at 1 req/s, plus an overloaded run."""
    return case_study(INPUTS, rate_rps=1.0, duration_s=2400.0, seed=0)


@pytest.mark.parametrize("name", ["prfaas_pd", "homogeneous", "naive_heterogeneous"])
def test_saturation_is_just_below_the_analytic_lambda_max(case_study_figures, name):
    """Saturation lands 0-4% below the model's Lambda_max (a server spends E[T(L)] >= T(E[L]), never less)."""
    figures = case_study_figures[name]
    assert -0.04 <= figures["saturation_vs_lambda_max"] <= 0.0


@pytest.mark.parametrize("name", ["prfaas_pd", "homogeneous", "naive_heterogeneous"])
def test_ttft_at_light_load_is_within_three_percent_of_the_paper(case_study_figures, name):
    """At 1 req/s, mean and P90 TTFT are within 3% of the paper's values (as docs/planner.md says); nothing is lost."""
    figures = case_study_figures[name]
    assert figures["ttft_mean_s"] == pytest.approx(PAPER[name]["ttft_mean_s"], rel=0.03)
    assert figures["ttft_p90_s"] == pytest.approx(PAPER[name]["ttft_p90_s"], rel=0.03)
    assert figures["throughput_rps"] == pytest.approx(1.0, rel=0.1)
    assert figures["lost_requests"] == 0


def test_offload_fraction_and_link_use_follow_the_plan(case_study_figures):
    """PrfaaS-PD offloads ~half the requests and uses a few percent of the 100 Gbps link at 1 req/s."""
    pd = case_study_figures["prfaas_pd"]
    assert pd["offload_fraction"] == pytest.approx(0.496, abs=0.04)
    assert 0.01 < pd["link_utilization"] < 0.1
    assert case_study_figures["homogeneous"]["offload_fraction"] == 0.0
    assert case_study_figures["naive_heterogeneous"]["offload_fraction"] == 1.0


def test_link_streams_layer_wise_and_shares_fairly():
    """One flow on an ample link ends with its prefill; three flows on 5 Gbps share it and end at 3 GB / 5 Gbps."""
    link = FluidLink(100.0)
    link.add(Flow("a", 1e9, 0.0, 2.5), 0.0)
    assert link.utilization() == pytest.approx(3.2 / 100)  # capped at its production rate
    assert link.next_event_s() == pytest.approx(2.5)
    assert [f.key for f in link.advance(2.5)] == ["a"]
    link = FluidLink(5.0)
    for key in "abc":
        link.add(Flow(key, 1e9, 0.0, 2.5), 0.0)
    done, now = [], 0.0
    while link.flows:
        now = link.next_event_s()
        done += link.advance(now)
    assert now == pytest.approx(3e9 * 8 / 5e9)
    assert link.overload_s == pytest.approx(now)


def test_sender_fifo_serves_each_senders_transfers_in_order():
    """Fair: one sender's two 1 GB transfers on 8 Gbps both end at 2 s; sender-fifo: the first at 1 s, the second at 2 s.

    Across senders sender-fifo is still fair: a second sender's transfer ends with the first one's at 2 s.
    """

    def ends(sharing: str, owners: str) -> dict[str, float]:
        link = FluidLink(8.0, sharing=sharing)
        for key, owner in zip("ab", owners, strict=True):
            link.add(Flow(key, 1e9, 0.0, 0.001, owner), 0.0)  # produced at once
        done = {}
        while link.flows:
            now = link.next_event_s()
            done |= {f.key: now for f in link.advance(now)}
        return done

    assert ends("fair", "pp") == pytest.approx({"a": 2.0, "b": 2.0})
    assert ends("sender-fifo", "pp") == pytest.approx({"a": 1.0, "b": 2.0})
    assert ends("sender-fifo", "pq") == pytest.approx({"a": 2.0, "b": 2.0})
    with pytest.raises(ValueError, match="sharing must be one of"):
        FluidLink(8.0, sharing="priority")


def test_link_capacity_schedule_applies():
    """A capacity drop slows a running transfer from the moment it happens."""
    link = FluidLink(8.0, schedule=((1.0, 4.0),))
    link.add(Flow("a", 2e9, 0.0, 0.001), 0.0)  # produced at once: 1 GB sent in the first second at 8 Gbps
    while link.flows:
        link.advance(link.next_event_s())
    assert link.now == pytest.approx(1.0 + 1e9 * 8 / 4e9)


def test_decode_server_runs_at_the_profiles_capacity():
    """A full continuous batch finishes requests at BS_max / (step * L_out), the model's decode rate."""
    server = DecodeServer("d", "pd", H20, MODEL)
    for i in range(3 * server.max_batch):
        server.arrive(SimRequest(i, 0.0, 1000, 1024, {}), 0.0)
    assert len(server.active) == server.max_batch and len(server.waiting) == 2 * server.max_batch
    finished = []
    while server.active:
        finished += server.complete(server.next_completion_s())
    rate = len(finished) / max(r.done_s for r in finished)
    assert rate == pytest.approx(MODEL.decode_rps(H20, 1024), rel=1e-6)


def test_trace_free_run_is_reproducible_and_drains():
    """The same spec and seed give the same run; with drain every request gets its tokens."""
    spec = SimSpec(
        MODEL,
        H200,
        4,
        H20,
        3,
        5,
        100.0,
        Empirical(lengths=[5000, 40000]),
        256,
        rate_rps=2.0,
        duration_s=120.0,
        policy_config=PolicyConfig(threshold_tokens=19_400),
    )
    a, b = Simulator(spec).run(), Simulator(spec).run()
    assert [r.ttft_s for r in a.requests] == [r.ttft_s for r in b.requests]
    assert all(r.done_s > r.first_token_s > r.arrival_s for r in a.requests)
    assert {r.remote for r in a.requests if r.prompt_tokens == 40000} == {True}
    assert {r.remote for r in a.requests if r.prompt_tokens == 5000} == {False}


def test_sim_cli_json_keys(capsys):
    """prfaas sim --json reports, per configuration, every figure the table shows."""
    assert main(["sim", "--case-study", "--duration", "300", "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    keys = {
        "saturation_rps",
        "lambda_max",
        "throughput_rps",
        "ttft_mean_s",
        "ttft_p50_s",
        "ttft_p90_s",
        "ttft_p99_s",
        "offload_fraction",
        "link_utilization",
    }
    for name in ("prfaas_pd", "homogeneous", "naive_heterogeneous"):
        assert keys <= set(doc["configs"][name])
    assert doc["paper"]["homogeneous"]["ttft_p90_s"] == 9.73
    assert doc["link_sharing"] == "sender-fifo"  # as kvwire paces


def test_progress_bar_reports_steps():
    """The progress bar writes its label and percentages (a line per 25% when not a terminal)."""
    stream = io.StringIO()
    bar = ProgressBar("run", 100.0, stream=stream)
    for t in range(0, 101, 5):
        bar(float(t))
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[-1] for line in lines] == ["0%", "25%", "50%", "75%", "100%"]
    assert all(line.startswith("run [") for line in lines)
