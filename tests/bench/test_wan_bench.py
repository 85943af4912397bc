"""``prfaas bench wan``: the link relay's bandwidth, RTT and TCP timing judged against their targets; a miss exits 1."""

from __future__ import annotations

import json

from libs.cli import main


def test_wan_benchmark_meets_a_small_link_and_exits_1_on_an_impossible_target(capsys) -> None:
    """0.2 Gbps and 5 ms set: achieved within 5% and 2 ms; TCP timing within 10% of the model; an RTT bound of 0.1 us exits 1."""
    argv = [
        "bench",
        "wan",
        "--json",
        "--gbps",
        "0.2",
        "--rtt-ms",
        "5",
        "--rounds",
        "1",
        "--warmup-s",
        "0.2",
        "--window-s",
        "0.5",
        "--pings",
        "10",
        "--tcp-rtt-ms",
        "20",
        "--tcp-gbps",
        "1",
        "--tcp-sizes-mib",
        "1,4",
        "--tcp-idle-s",
        "0.3",
        "--tcp-rounds",
        "1",
        "--keepalive-ms",
        "100,300",
        "--keepalive-mib",
        "4",
        "--host-mib",
        "4",
        "--host-gbps",
        "1",
        "--host-window-mib",
        "0.25",
        "--target",
        "delay.error_ms=0.0001",
        # The benchmark's 10% is for a machine it has to itself; beside the rest of the suite on 2 cores a
        # 1 MiB transfer's ~12 ms pays a few ms of scheduling, so the smoke test bounds the mechanism at 30%.
        "--target",
        "tcp_model.max_error=0.3",
        "--target",
        "keepalive.max_error=0.3",
    ]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    figures = json.loads(out)
    assert figures["missed"] == ["delay.error_ms"] and "MISSED" in err
    assert 0.95 <= figures["bandwidth_ratio"]["min"] <= figures["bandwidth_ratio"]["max"] <= 1.05
    assert 5.0 <= figures["delay"]["achieved_rtt_ms"] <= 7.0  # never under the set delay; 2 ms is the target's slack
    met = {v["figure"]: v["met"] for v in figures["verdicts"]}
    assert met["tcp_model.max_error"] and met["keepalive.max_error"]
    cases = {(c["case"], c["size_mib"]) for c in figures["tcp_model"]["cases"]}
    assert cases == {
        (case, size)
        for case in ("new connection", "idle, slow start after idle", "idle, window kept")
        for size in (1.0, 4.0)
    }
    kept, restarted = figures["keepalive"]["cases"]  # 100 ms is under the 220 ms RTO, 300 ms is over it
    assert (kept["case"], restarted["case"]) == ("keepalive 100 ms, window kept", "keepalive 300 ms, slow start")
    assert kept["measured_ms"] < 0.5 * restarted["measured_ms"]  # 4 MiB at line rate vs 8 slow-start rounds
    # kvwire over the relay, 4 MiB over 4 stripes at 1 Gbps / 20 ms, 0.3 s idle (the RTO is 220 ms): a kept window
    # (keepalives, or slow start after idle off) takes the begin's round trip and line rate (~64 ms); a restart or
    # new connections pay ~6 slow-start rounds (~155, ~175 ms); a 256 KiB window, 4 windows per stripe (~110 ms).
    host = {c["case"]: c["measured_ms"] for c in figures["host_settings"]["cases"]}
    assert host["warm, keepalive"] < 0.6 * min(host["warm, slow start after idle"], host["new connections"])
    assert host["warm, no slow start after idle"] < 0.6 * host["warm, slow start after idle"]
    assert host["warm, keepalive"] < 0.8 * host["warm, receive window"]
    assert not {v["binding"] for v in figures["verdicts"] if v["figure"] == "host_settings.max_error"} - {False}
