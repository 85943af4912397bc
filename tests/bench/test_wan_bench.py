"""``prfaas bench wan``: the link relay's bandwidth and RTT judged against what was set; a miss exits 1."""

from __future__ import annotations

import json

from libs.cli import main


def test_wan_benchmark_meets_a_small_link_and_exits_1_on_an_impossible_target(capsys) -> None:
    """0.2 Gbps and 5 ms set: achieved within 5% and 2 ms; an RTT error bound of 0.1 us is missed, exit status 1."""
    argv = ["bench", "wan", "--json", "--gbps", "0.2", "--rtt-ms", "5", "--rounds", "1", "--warmup-s", "0.2",
            "--window-s", "0.5", "--pings", "10", "--target", "delay.error_ms=0.0001"]  # fmt: skip
    assert main(argv) == 1
    out, err = capsys.readouterr()
    figures = json.loads(out)
    assert figures["missed"] == ["delay.error_ms"] and "MISSED" in err
    assert 0.95 <= figures["bandwidth_ratio"]["min"] <= figures["bandwidth_ratio"]["max"] <= 1.05
    assert 5.0 <= figures["delay"]["achieved_rtt_ms"] <= 7.0  # never under the set delay; 2 ms is the target's slack
