"""``prfaas bench engine``: a tiny run prints every figure, medians with their range."""

from __future__ import annotations

import json

import pytest

from libs.bench.engine import prefill_flops
from libs.cli import main
from libs.engine.model import ReferenceModel


def test_engine_benchmark_prints_its_figures_as_json_and_exits_1_on_a_miss(capsys) -> None:
    """The JSON has prefill tokens/s by length, decode tokens/s by batch, GEMM rate and the 4K fraction; a 4K prefill
    at 100x the GEMM rate cannot be met: exit 1, the figure printed MISSED."""
    argv = ["bench", "engine", "--json", "--lengths", "256", "--batches", "1,2", "--decode-tokens", "4"]
    assert main([*argv, "--repeats", "1", "--gemm-size", "256", "--target", "prefill_4k_gemm_fraction.median=100"]) == 1
    out, err = capsys.readouterr()
    figures = json.loads(out)
    assert figures["missed"] == ["prefill_4k_gemm_fraction.median"] and "MISSED" in err
    assert set(figures["prefill_tokens_per_s"]) == {"256", "4096"}
    assert set(figures["decode_tokens_per_s"]) == {"1", "2"}
    assert figures["gemm_gflops"]["median"] > 0 and figures["prefill_4k_gflops"]["median"] > 0
    fraction = figures["prefill_4k_gflops"]["median"] / figures["gemm_gflops"]["median"]
    assert abs(figures["prefill_4k_gemm_fraction"]["median"] - fraction) < 1e-9  # one try: one ratio


def test_engine_benchmark_reports_medians_with_their_range(capsys) -> None:
    """Each figure is the median of its tries with min <= median <= max."""
    argv = ["bench", "engine", "--json", "--lengths", "128", "--batches", "1", "--decode-tokens", "2"]
    main([*argv, "--repeats", "2", "--gemm-size", "128"])  # each try prefills 4K tokens: seconds apiece on a busy host
    figures = json.loads(capsys.readouterr().out)
    for fig in (figures["prefill_tokens_per_s"]["128"], figures["decode_tokens_per_s"]["1"], figures["gemm_gflops"]):
        assert 0 < fig["min"] <= fig["median"] <= fig["max"]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--lengths", "abc", "--lengths: expected comma-separated integers, got 'abc'"),
        ("--lengths", "0", "--lengths: 0 is outside"),
        ("--batches", "-3", "--batches: -3 is outside"),
    ],
)
def test_bad_lists_are_one_clear_line(capsys, flag: str, value: str, message: str) -> None:
    """A malformed list exits 2 with one line naming the flag, before any measuring."""
    assert main(["bench", "engine", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_counts_are_usage_errors(capsys) -> None:
    """``--repeats 0`` is refused by the argument parser (exit 2, names the flag)."""
    with pytest.raises(SystemExit) as exc:
        main(["bench", "engine", "--repeats", "0"])
    assert exc.value.code == 2
    assert "--repeats: expected a positive integer, got 0" in capsys.readouterr().err


def test_flop_count_grows_linearly_plus_causal_attention() -> None:
    """Model FLOPs: 2 x dense params per token, causal attention T(T+1)/2, recurrent linear attention."""
    model = ReferenceModel()
    cfg = model.config
    per_token_dense = 2 * (
        6 * (cfg.d_model * (4 * cfg.d_model + cfg.n_heads) + cfg.d_model**2)
        + 2 * (cfg.d_model * 2 * cfg.d_model + cfg.d_model**2)
        + 8 * 3 * cfg.d_model * cfg.d_ff
    )
    linear = 6 * 7 * cfg.n_heads * cfg.head_dim**2
    attention = 2 * 4 * cfg.d_model * 1000 * 1001 // 2
    head = 2 * cfg.d_model * cfg.vocab_size
    assert prefill_flops(cfg, model.weights, 1000) == 1000 * (per_token_dense + linear) + attention + head
