"""plan, sim and bench policy answer bad input with one line naming the problem and a non-zero exit."""

from __future__ import annotations

import json
import warnings

import pytest

from libs.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--case-study", "--plot", "/missing/dir/p.png"], "directory '/missing/dir' does not exist"),
        (["plan", "--case-study", "--plot", "x.txt"], "must end in .png, .pdf, .svg"),
        (["sim", "--case-study", "--plot", "/missing/dir/s.png"], "directory '/missing/dir' does not exist"),
        (["sim", "--case-study", "--rate", "0"], "--rate must be positive, got 0"),
        (["sim", "--case-study", "--duration", "0"], "--duration must be positive, got 0"),
        (["sim", "--case-study", "--duration", "-5"], "--duration must be positive, got -5"),
        (["sim", "--case-study", "--timeout-s", "-1"], "--timeout-s must be positive, got -1"),
        (["sim", "--case-study", "--seed", "-1"], "--seed must be >= 0, got -1"),
        (
            ["sim", "--scenario", "link-degradation", "--link-gbps", "5", "--degraded-gbps", "10"],
            "--degraded-gbps must be below the link's 5 Gbps, got 10",
        ),
        (["sim", "--case-study", "--degraded-gbps", "3"], "--degraded-gbps applies to --scenario link-degradation"),
        (["plan", "--case-study", "--workload", "lognormal:mu=9.9"], "missing sigma"),
        (["plan", "--case-study", "--workload", "lognormal:sigma=1"], "missing mu"),
        (["plan", "--case-study", "--workload", "lognormal:mu=9.9,sigma=1,mx=5"], "'mx=5' is not one of"),
        (["plan", "--case-study", "--workload", "lognormal:mu=9.9,sigma=x"], "sigma must be a finite number"),
        (["plan", "--model", "kimi-linear-1t"], "missing --prfaas-hw"),
        (["bench", "policy", "--decisions", "0"], "--decisions must be at least 1, got 0"),
        (["bench", "policy", "--decisions", "-3"], "--decisions must be at least 1, got -3"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv: list[str], message: str) -> None:
    """Exit code 2 and a single ``prfaas: bad_request: ...`` line containing the message."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    [line] = captured.err.strip().splitlines()
    assert line.startswith("prfaas: bad_request: ") and message in line
    assert captured.out == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no lengths in it"), ("100\n-5\n", "positive number"), ("100\nabc\n", "one number per line")],
)
def test_a_bad_workload_file_is_one_line_without_warnings(tmp_path, capsys, content: str, message: str) -> None:
    """An empty or malformed lengths file is a one-line error naming the file; numpy's warnings do not leak."""
    path = tmp_path / "lengths.txt"
    path.write_text(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["plan", "--case-study", "--workload", f"file:{path}"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(path) in line and message in line


def test_scenario_defaults_to_the_case_study_and_reports_its_telemetry(capsys) -> None:
    """sim --scenario link-degradation needs no deployment flags; its JSON says how the policies saw the link."""
    assert main(["sim", "--scenario", "link-degradation", "--duration", "240", "--json", "--no-progress"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["model"] == "kimi-linear-1t" and doc["inputs"]["link_gbps"] == 100.0
    settings = doc["settings"]
    assert settings["rate_rps"] == pytest.approx(2.7) and settings["degraded_gbps"] == 10.0
    assert {"interval_s", "lag_s", "window_bytes", "budget_gbps", "router"} <= set(settings["telemetry"])
    assert {"smoothing_s", "stale_after_s", "min_limited_s", "hold_s"} <= set(settings["telemetry"]["router"])
    assert set(doc["policies"]) == {"static-threshold", "adaptive", "cost-model", "adaptive+slow", "cost-model+slow"}
    assert settings["link_sharing"] == "sender-fifo"  # as kvwire paces


def test_scenario_degrades_a_narrower_link_to_a_tenth(capsys) -> None:
    """With --link-gbps 5 the scenario degrades 5 -> 0.5 Gbps and offers 0.835 x the planned Lambda_max."""
    assert (
        main(
            [
                "sim",
                "--scenario",
                "link-degradation",
                "--link-gbps",
                "5",
                "--duration",
                "120",
                "--json",
                "--no-progress",
            ]
        )
        == 0
    )
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["degraded_gbps"] == pytest.approx(0.5)
    assert settings["rate_rps"] < 2.7  # the 5 Gbps plan carries less
