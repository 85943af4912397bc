"""``prfaas bench router``: decision latency and the router's TTFT overhead, every service in its own process."""

from __future__ import annotations

import json

import pytest

from libs.cli import main


def test_router_benchmark_serves_every_case_through_both_paths(capsys) -> None:
    """Every request of every case gets its first token on both paths; each figure names what it measured."""
    args = ["bench", "router", "--json", "--decisions", "5", "--rounds", "1", "--requests", "3", "--c50-requests", "60"]
    assert main(args) == 0
    figures = json.loads(capsys.readouterr().out)
    for name in ("decision_1k", "decision_32k"):
        assert figures[name]["n"] == 5 and 0 < figures[name]["p50_ms"] <= figures[name]["p99_ms"], name
    for name, requests in (("overhead_c1", 3), ("overhead_c50", 60)):
        case = figures[name]
        assert case["router_ttft"]["n"] == case["direct_ttft"]["n"] == requests, name
    cpu = figures["overhead_c50"]["cpu_ms_per_request"]  # (CPU clocks tick every 10 ms: 60 requests, not 3)
    assert cpu["router"]["router"] > 3 * cpu["direct"]["router"]  # the router works on its own path only
    assert figures["decisions"]["total"] == 3 + 60 and figures["decisions"]["retries"] == 0
    assert figures["targets"]["overhead_c50_p50_ms_max"] == 3.0


@pytest.mark.parametrize("flag", ["--decisions", "--rounds", "--requests", "--c50-requests", "--prefill-instances"])
def test_router_benchmark_refuses_counts_below_one(flag: str, capsys) -> None:
    """A count below one is a one-line error and exit 2, before anything starts."""
    assert main(["bench", "router", flag, "0"]) == 2
    assert capsys.readouterr().err.strip() == f"prfaas: config: {flag} must be >= 1, got 0"
