"""``prfaas bench gateways``: a small run prints every documented figure as medians with their range."""

from __future__ import annotations

import json

from libs.cli import main


def test_gateways_benchmark_prints_its_figures_as_json(capsys):
    """reference.tcp/jetstream, pipelining, prefix_reuse and overhead_p50_ms are in the JSON; tokens are identical."""
    argv = ["bench", "gateways", "--json", "--repeats", "1", "--overhead-requests", "3", "--ref-tokens", "128",
            "--prefix-tokens", "640", "--paced-tokens", "1024", "--max-tokens", "4"]
    code = main(argv)
    figures = json.loads(capsys.readouterr().out)
    assert code == (1 if figures["missed_targets"] else 0)
    for transport in ("tcp", "jetstream"):
        case = figures["reference"][transport]
        assert case["tokens_identical"] is True
        for key in ("ttft_s", "queue_s", "prefill_s", "transfer_s", "decode_first_token_s"):
            assert case[key]["min"] <= case[key]["median"] <= case[key]["max"]
    assert {"prefill_s", "transfer_s", "transfer_exposed_s"} <= set(figures["pipelining"])
    reuse = figures["prefix_reuse"]
    assert reuse["tokens_identical"] is True and reuse["bytes_second"]["median"] < reuse["bytes_first"]["median"]
    assert reuse["held_blocks"]["median"] == int(0.8 * 640) // 64
    assert figures["overhead_p50_ms"] == figures["overhead"]["overhead_ms"]["median"]
