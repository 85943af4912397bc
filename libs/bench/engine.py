"""Reference engine benchmark: prefill tokens/s at 1K/4K/16K, decode tokens/s at batch 1/16, vs numpy GEMM.

Target: a 4K-token prefill reaches >= 30% of this machine's float32 GEMM rate (a square
``--gemm-size`` matmul, best of several tries, measured in the same run and interleaved with the
4K prefills so both see the same load), counted in model FLOPs. Every figure is the median of
``--repeats`` tries, printed with its range (the machine may be shared); the 4K fraction is the
median of the per-try ratios of prefill rate to the GEMM rate measured just before it. Model FLOPs:

- dense matmuls: 2 x (mixer projection + MLP weights) per token in every layer, plus the output
  head for the last position only (prefill needs no other logits);
- full attention, causal: q.k and p.v over the visible keys, 4 * heads * head_dim * T(T+1)/2 per
  full-attention layer (the masked half is not counted);
- linear attention, counted in its recurrent form (the lower bound; the chunkwise form does more):
  7 * d_k * d_v per head and token (read S^T(a*k), decay S, rank-1 write, read S^T q).
Norms, activations, exp and the chunkwise form's extra work are executed but not counted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from libs.bench.targets import conclude
from libs.common.errors import BadRequest
from libs.engine.batch import DecodeBatch, DecodeSequence
from libs.engine.model import ReferenceModel
from libs.engine.reference_config import ReferenceConfig
from libs.engine.sampling import Sampling
from libs.engine.state import RequestState
from libs.engine.weights import AttentionWeights, ReferenceWeights

_FOUR_K = 4096
_MAX_TOKENS = 131_072


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--lengths", default="1024,4096,16384", help="prefill lengths in tokens (default %(default)s)")
    parser.add_argument("--batches", default="1,16", help="decode batch sizes (default %(default)s)")
    parser.add_argument(
        "--decode-tokens", type=_positive_int, default=64, help="timed decode steps (default %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=_positive_int, default=5, help="tries per figure, median kept (default %(default)s)"
    )
    parser.add_argument(
        "--gemm-size", type=_positive_int, default=2048, help="square GEMM size for the baseline (default %(default)s)"
    )


def _positive_int(text: str) -> int:
    """An integer >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_list(flag: str, text: str, low: int, high: int) -> list[int]:
    """Comma-separated integers in [low, high] (BadRequest names the flag and the bad item)."""
    values = []
    for item in text.split(","):
        try:
            value = int(item)
        except ValueError:
            raise BadRequest(f"{flag}: expected comma-separated integers, got {item!r}") from None
        if not low <= value <= high:
            raise BadRequest(f"{flag}: {value} is outside [{low}, {high}]")
        values.append(value)
    return values


def prefill_flops(config: ReferenceConfig, weights: ReferenceWeights, n_tokens: int) -> int:
    """Model FLOPs of one prefill of ``n_tokens`` tokens from scratch (the count in the module docstring)."""
    dense_params = 0
    for layer in weights.layers:
        mixer = layer.mixer
        mats = (mixer.w_qkv, mixer.w_out) if isinstance(mixer, AttentionWeights) else (mixer.w_in, mixer.w_out)
        dense_params += sum(m.size for m in (*mats, layer.w_gate_up, layer.w_down))
    attention = len(config.full_layers) * 4 * config.n_heads * config.head_dim * n_tokens * (n_tokens + 1) // 2
    linear = len(config.linear_layers) * 7 * config.n_heads * config.head_dim**2 * n_tokens
    return 2 * dense_params * n_tokens + attention + linear + 2 * weights.unembedding.size


def _timed_s(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _summary(values: list[float]) -> dict[str, float]:
    """Median and range of one figure's tries."""
    return {"median": float(np.median(values)), "min": min(values), "max": max(values)}


def _prompt(n_tokens: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([[256], rng.integers(32, 127, n_tokens - 1)]).astype(np.int32)


def _decode_tokens_per_s(model: ReferenceModel, batch_size: int, steps: int, repeats: int) -> list[float]:
    """Tokens/s of ``batch_size`` requests (1K-token prompts) decoding ``steps`` tokens together, per try."""
    prompts = [_prompt(1024, seed) for seed in range(batch_size)]
    states = [model.prefill_state(p) for p in prompts]
    rates = []
    for _ in range(repeats):
        batch = DecodeBatch(model)
        for i, state in enumerate(states):
            fresh = RequestState.from_parts(model.config, state.to_parts())
            batch.add(DecodeSequence(str(i), fresh, steps, Sampling(ignore_eos=True), model.config.eos_id))
        start = time.perf_counter()
        while batch.sequences:
            batch.step()
        rates.append(batch_size * steps / (time.perf_counter() - start))
    return rates


def run(args: argparse.Namespace) -> int:
    """Measure and print the figures (text or JSON) with the verdict on the 4K target (exit 1 if missed)."""
    lengths = sorted(set(_int_list("--lengths", args.lengths, 2, _MAX_TOKENS)) | {_FOUR_K})
    batches = _int_list("--batches", args.batches, 1, 256)
    model = ReferenceModel()
    gemm = np.random.default_rng(0).standard_normal((args.gemm_size, args.gemm_size)).astype(np.float32)
    gemm_flops = 2 * args.gemm_size**3
    model.prefill_state(_prompt(256, 0))  # warm up
    gemm @ gemm
    flops_4k = prefill_flops(model.config, model.weights, _FOUR_K)

    prefill_rates: dict[int, list[float]] = {}
    gemm_rates: list[float] = []
    fractions: list[float] = []
    for n in lengths:
        print(f"prefill {n} tokens ...", file=sys.stderr, flush=True)
        tokens = _prompt(n, n)
        repeats = args.repeats if n <= _FOUR_K else max(1, args.repeats // 2)
        prefill_rates[n] = []
        for _ in range(repeats):
            if n == _FOUR_K:  # interleave the baseline with the 4K prefills: each try has its own ratio
                gemm_gflops = gemm_flops / min(_timed_s(lambda: gemm @ gemm) for _ in range(2)) / 1e9
                gemm_rates.append(gemm_gflops)
            seconds = _timed_s(lambda t=tokens: model.prefill_state(t))
            prefill_rates[n].append(n / seconds)
            if n == _FOUR_K:
                fractions.append(flops_4k / seconds / 1e9 / gemm_gflops)
    decode = {}
    for b in batches:
        print(f"decode batch {b} ...", file=sys.stderr, flush=True)
        decode[b] = _decode_tokens_per_s(model, b, args.decode_tokens, args.repeats)

    prefill_4k = _summary([rate * flops_4k / _FOUR_K / 1e9 for rate in prefill_rates[_FOUR_K]])
    figures = {
        "repeats": args.repeats,
        "prefill_tokens_per_s": {str(n): _summary(v) for n, v in prefill_rates.items()},
        "decode_tokens_per_s": {str(b): _summary(v) for b, v in decode.items()},
        "gemm_gflops": _summary(gemm_rates),
        "prefill_4k_gflops": prefill_4k,
        "prefill_4k_gemm_fraction": _summary(fractions),
        "prefill_4k_model_gflop": flops_4k / 1e9,
    }
    fraction = figures["prefill_4k_gemm_fraction"]

    def spread(fig: dict[str, float], fmt: str) -> str:
        return f"{fig['median']:{fmt}}  [{fig['min']:{fmt}} .. {fig['max']:{fmt}}]"

    rows = [f"medians of {args.repeats} tries [range]"]
    rows += [
        f"prefill {int(n):>6} tokens   {spread(fig, ',.0f')} tokens/s"
        for n, fig in figures["prefill_tokens_per_s"].items()
    ]
    rows += [
        f"decode  batch {int(b):>3}       {spread(fig, ',.0f')} tokens/s"
        for b, fig in figures["decode_tokens_per_s"].items()
    ]
    rows += [
        f"numpy float32 GEMM ({args.gemm_size}^3)  {spread(figures['gemm_gflops'], '.1f')} GFLOP/s",
        f"4K prefill: {figures['prefill_4k_model_gflop']:.2f} model GFLOP at {spread(prefill_4k, '.1f')} GFLOP/s"
        f" = {spread(fraction, '.1%')} of GEMM",
    ]
    return conclude(args, figures, "\n".join(rows))
