"""The planner reproduces the paper's case study and accounts for a binding link."""

from __future__ import annotations

import json

import pytest

from libs.cli import main
from libs.engine.profiles import HARDWARE, MODELS
from libs.lab.demo import CASE_STUDY_THRESHOLD_TOKENS
from libs.planner.search import PlanInputs, homogeneous, naive_heterogeneous, planned_threshold, search_prfaas_pd
from libs.planner.workloads import CASE_STUDY_WORKLOAD

CONFIG_KEYS = {
    "threshold_tokens",
    "offload_fraction",
    "n_prfaas",
    "n_p",
    "n_d",
    "theta_prfaas",
    "theta_pdp",
    "theta_pdd",
    "lambda_max",
    "egress_gbps",
}


def case_study(link_gbps: float = 100.0) -> PlanInputs:
    """The paper's inputs (optionally with another link)."""
    return PlanInputs(
        MODELS["kimi-linear-1t"], HARDWARE["h200"], 4, HARDWARE["h20"], 8, link_gbps, CASE_STUDY_WORKLOAD, 1024
    )


def run_cli(capsys, *argv: str) -> dict:
    """Run ``prfaas`` with ``argv`` and parse its JSON output."""
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_case_study_reproduces_the_paper_derived_results(capsys):
    """plan --case-study derives the paper's t (19.4K), Lambda_max of PrfaaS-PD (3.24) and naive (2.45), N_p/N_d, egress."""
    doc = run_cli(capsys, "plan", "--case-study", "--json")
    pd, homo, naive = doc["prfaas_pd"], doc["homogeneous"], doc["naive_heterogeneous"]
    for name in ("prfaas_pd", "homogeneous", "naive_heterogeneous"):
        assert CONFIG_KEYS <= set(doc[name])
    assert pd["threshold_tokens"] == pytest.approx(19_400, rel=0.01)
    assert pd["offload_fraction"] == pytest.approx(0.496, abs=0.005)
    assert pd["lambda_max"] == pytest.approx(3.24, rel=0.01)
    assert naive["lambda_max"] == pytest.approx(2.45, rel=0.01)
    assert (pd["n_prfaas"], pd["n_p"], pd["n_d"]) == (4, 3, 5)
    assert (homo["n_p"], homo["n_d"]) == (9, 3)
    assert (naive["n_prfaas"], naive["n_p"], naive["n_d"]) == (4, 0, 8)
    assert 11.0 <= pd["egress_gbps"] <= 14.0  # paper: ~13 Gbps
    assert doc["ratios"]["prfaas_pd"] == pytest.approx(1.54, rel=0.01)
    assert doc["ratios"]["naive_heterogeneous"] == pytest.approx(1.16, rel=0.02)
    assert planned_threshold(case_study()) == pd["threshold_tokens"]  # what a router's PolicyConfig is given
    assert pd["threshold_tokens"] == CASE_STUDY_THRESHOLD_TOKENS  # the lab demo scales prompt lengths by it


def test_calibration_inputs_are_restated_not_derived(capsys):
    """Values the H20 and decode calibration fix by construction: homogeneous 2.11, Theta_pdp 1.64, Theta_pdd."""
    doc = run_cli(capsys, "plan", "--case-study", "--json")
    pd, homo, naive = doc["prfaas_pd"], doc["homogeneous"], doc["naive_heterogeneous"]
    assert homo["lambda_max"] == pytest.approx(2.11, rel=0.01)  # = 9 / T_H20(27.5K), calibrated to the table
    assert pd["theta_pdp"] == pytest.approx(1.64, rel=0.01)  # = 3 / T_H20(10.2K), calibrated to the table
    assert pd["theta_prfaas"] == pytest.approx(1.61, rel=0.01)  # = 4 / T_H200(45K), the paper's H200 profile
    for config, theta in ((pd, 3.91), (homo, 2.35), (naive, 6.25)):
        assert config["theta_pdd"] == pytest.approx(theta, rel=0.01)  # N_d x 0.784 req/s, the decode calibration


def test_baselines_report_null_for_a_path_nothing_takes(capsys):
    """The baselines' JSON has null, not a sentinel, for the threshold and for the mean length of an unused path."""
    doc = run_cli(capsys, "plan", "--case-study", "--json")
    homo, naive = doc["homogeneous"], doc["naive_heterogeneous"]
    assert homo["threshold_tokens"] is None and naive["threshold_tokens"] is None
    assert homo["l_long_tokens"] is None and homo["l_short_tokens"] == pytest.approx(27_500, rel=0.01)
    assert naive["l_short_tokens"] is None and naive["l_long_tokens"] == pytest.approx(27_500, rel=0.01)


def test_cost_normalized_gain_restates_the_price_calibration(capsys):
    """At equal hardware cost PrfaaS-PD gains ~15% over homogeneous PD: H200 is priced at 2x H20 to give it."""
    doc = run_cli(capsys, "plan", "--case-study", "--json", "--cost-normalized")
    gain = doc["cost_normalized"]["prfaas_pd"]["gain_vs_homogeneous"]
    assert gain == pytest.approx(1.15, abs=0.01)
    assert doc["cost_normalized"]["homogeneous"]["gain_vs_homogeneous"] == pytest.approx(1.0)


def test_a_narrow_link_binds_and_moves_the_threshold():
    """At 5 Gbps the search keeps egress within the link, raises t and gives more instances to local prefill."""
    wide, narrow = search_prfaas_pd(case_study()).throughput, search_prfaas_pd(case_study(5.0)).throughput
    assert narrow.egress_gbps <= 5.0 + 1e-6
    assert narrow.egress_gbps == pytest.approx(5.0, rel=0.02)  # the link is the bound it saturates
    assert narrow.threshold_tokens > 1.5 * wide.threshold_tokens
    assert narrow.n_p > wide.n_p
    assert narrow.lambda_max < wide.lambda_max
    assert naive_heterogeneous(case_study(5.0)).throughput.lambda_max < 1.0  # everything over 5 Gbps
    assert homogeneous(case_study(5.0)).throughput.lambda_max == pytest.approx(2.11, rel=0.03)  # no link used


def test_general_use_other_model_hardware_and_workload(capsys, tmp_path):
    """plan works for any profile, hardware, budget, link and an empirical workload, with the same JSON shape."""
    lengths = tmp_path / "lengths.txt"
    lengths.write_text("\n".join(str(n) for n in [2000, 4000, 8000, 16000, 32000, 64000, 100000] * 20))
    doc = run_cli(
        capsys,
        "plan",
        "--model",
        "qwen3.5-397b",
        "--prfaas-hw",
        "rubin-cpx",
        "--n-prfaas",
        "2",
        "--pd-hw",
        "h200",
        "--n-pd",
        "6",
        "--link-gbps",
        "50",
        "--workload",
        f"file:{lengths}",
        "--output-tokens",
        "512",
        "--json",
    )
    pd = doc["prfaas_pd"]
    assert CONFIG_KEYS <= set(pd)
    assert pd["n_p"] + pd["n_d"] == 6 and pd["n_prfaas"] == 2
    assert pd["lambda_max"] >= max(doc["homogeneous"]["lambda_max"], doc["naive_heterogeneous"]["lambda_max"]) - 1e-9
    assert doc["inputs"]["workload"]["kind"] == "empirical"


def test_bad_inputs_are_reported(capsys):
    """Missing flags or an unknown workload spec exit with code 2 and a message naming the problem."""
    assert main(["plan", "--model", "kimi-linear-1t"]) == 2
    assert "--prfaas-hw" in capsys.readouterr().err
    assert main(["plan", "--case-study", "--workload", "zipf:1"]) == 2
    assert "workload" in capsys.readouterr().err


def test_plot_is_written(tmp_path, capsys):
    """--plot writes a PNG of the bounds against t and N_p; the table's footer reads as text."""
    out = tmp_path / "plan.png"
    assert main(["plan", "--case-study", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "Lambda_max" in text
    assert "workload lognormal mu 9.9 sigma 1 in [128, 131,072]" in text and "{" not in text
