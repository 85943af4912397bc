"""``prfaas bench gateways``: a small run's figures are within their targets, and a missed target exits 1."""

from __future__ import annotations

import json

from libs.cli import main

IMPOSSIBLE = "prefix_reuse.bytes_fraction.median=0.01"  # the linear states always travel: never 1% of the first


def test_gateways_benchmark_figures_meet_their_targets_and_a_missed_one_exits_1(capsys):
    """Tokens identical, layer-wise streaming hides most of what the no-overlap run exposes, the receiver gets the
    budget, the held prefix is not resent; the impossible bytes target is missed, named, and the exit status is 1."""
    argv = [
        "bench",
        "gateways",
        "--json",
        "--repeats",
        "1",
        "--overhead-requests",
        "10",
        "--ref-tokens",
        "128",
        "--prefix-tokens",
        "640",
        "--paced-tokens",
        "1024",
        "--max-tokens",
        "4",
        "--target",
        IMPOSSIBLE,
        # The pool case at one RTT with a short prompt; its target (one RTT) is for a quiet machine: beside the
        # suite on 2 cores the decode side's first step and the messages around it stray by tens of ms.
        "--pool-rtt-ms",
        "80",
        "--pool-tokens",
        "2048",
        "--target",
        "warm_pool.exposed_rtts=3",
    ]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    figures = json.loads(out)
    verdicts = {v["figure"]: v for v in figures["verdicts"]}
    assert "MISSED" in err and "prefix_reuse.bytes_fraction.median" in err
    assert not verdicts["prefix_reuse.bytes_fraction.median"]["met"]
    # The overhead target (5 ms over the modelled prefill and step) is for a quiet machine; the rest hold anywhere.
    assert set(figures["missed"]) - {"overhead_p50_ms"} == {"prefix_reuse.bytes_fraction.median"}, figures["missed"]
    assert verdicts["tokens_identical"]["met"] and verdicts["pipelining.exposed_fraction.median"]["met"]
    assert verdicts["pipelining.receiver_vs_budget.median"]["met"]
    pipelining = figures["pipelining"]
    # Without layer-wise streaming the whole transfer follows the prefill: most of its bytes at the budget.
    no_overlap = pipelining["no_overlap"]["transfer_exposed_s"]["median"]
    assert 0.5 * pipelining["bytes_at_budget_s"] <= no_overlap <= 2 * pipelining["bytes_at_budget_s"]
    assert figures["prefix_reuse"]["held_blocks"]["median"] == int(0.8 * 640) // 64
    overhead = figures["overhead"]
    assert overhead["requests"] == 10 and figures["overhead_p50_ms"] == overhead["overhead_ms"]["median"]
    # TTFT cannot beat the modelled prefill and step it waits out. 50 ms: this figure read 15-25 ms on a 2-core
    # machine loaded by other test runs (the simulated backend oversleeps), so a stray 50 ms in the path still shows.
    assert 0 <= figures["overhead_p50_ms"] <= 50
    # The pool: a cold request opens its four stripes through the relay, the warm one after 0.5 s idle opens none;
    # the cold one pays its connects and slow start at 80 ms (at least the connect's round trip), the warm less.
    cold, warm = figures["cold_pool"], figures["warm_pool"]
    assert cold["connections_opened"]["median"] == 4 and warm["connections_opened"]["max"] == 0
    assert verdicts["warm_pool.exposed_rtts"]["met"] and warm["exposed_rtts"] < cold["exposed_rtts"]
    assert cold["by_rtt_ms"]["80"]["exposed_ms"]["median"] >= 80
