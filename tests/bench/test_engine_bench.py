"""``prfaas bench engine``: a tiny run prints every figure the issue names."""

from __future__ import annotations

import json

from libs.cli import main
from libs.bench.engine import prefill_flops
from libs.engine.model import ReferenceModel


def test_engine_benchmark_prints_its_figures_as_json(capsys) -> None:
    """The JSON has prefill tokens/s by length, decode tokens/s by batch, GEMM rate and the 4K fraction."""
    argv = ["bench", "engine", "--json", "--lengths", "256", "--batches", "1,2", "--decode-tokens", "4"]
    assert main([*argv, "--repeats", "1", "--gemm-size", "256"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures["prefill_tokens_per_s"]) == {"256", "4096"}
    assert set(figures["decode_tokens_per_s"]) == {"1", "2"}
    assert figures["gemm_gflops"] > 0 and figures["prefill_4k_gflops"] > 0
    fraction = figures["prefill_4k_gflops"] / figures["gemm_gflops"]
    assert abs(figures["prefill_4k_gemm_fraction"] - fraction) < 1e-9


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
