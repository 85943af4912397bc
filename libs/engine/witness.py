"""Did a decode side continue from the state a monolithic run would have? Its log probabilities, compared.

The first generated token is sampled from the prefill's logits; the second from the first decode
step, which reads every layer's transferred state (K/V of every block, the linear states). So the
log probabilities of the first ``steps`` tokens (each with its top alternatives) are compared with
those of a monolithic run of the same prompt. Lossless transfers agree to float32 rounding (about
2e-6 here); a zeroed layer moves them by more than 0.3, one zeroed or foreign K/V block of a 16K-token
prompt by more than 1e-3 (tests/engine/test_witness.py), so ``LOGPROB_ATOL`` sits between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

from libs.common.messages import Sampling, TokenLogprob
from libs.engine.batch import DecodeBatch, DecodeSequence
from libs.engine.model import ReferenceModel
from libs.engine.state import RequestState

LOGPROB_ATOL = 1e-4  # largest difference of a log probability accepted as rounding
WITNESS_STEPS = 2  # the prefill's logits, then the first decode step over the whole transferred state
WITNESS_TOP = 20  # alternatives compared per step (OpenAI's top_logprobs limit)


def monolithic_logprobs(
    model: ReferenceModel, prompt: Sequence[int], steps: int = WITNESS_STEPS, top: int = WITNESS_TOP
) -> list[TokenLogprob]:
    """Log probabilities of the first ``steps`` greedy tokens of ``prompt`` prefilled and decoded in this process."""
    return state_logprobs(model, model.prefill_state(prompt), steps, top)


def state_logprobs(
    model: ReferenceModel, state: RequestState, steps: int = WITNESS_STEPS, top: int = WITNESS_TOP
) -> list[TokenLogprob]:
    """Log probabilities of the first ``steps`` greedy tokens decoded from ``state`` (which it advances)."""
    batch = DecodeBatch(model)
    batch.add(DecodeSequence("witness", state, steps, Sampling(ignore_eos=True, logprobs=top), model.config.eos_id))
    logprobs: list[TokenLogprob] = []
    while batch.sequences:
        logprobs += [lp for out in batch.step().values() for lp in out.logprobs]
    return logprobs


def logprob_mismatch(got: Sequence[TokenLogprob], want: Sequence[TokenLogprob]) -> float:
    """Largest difference between two runs' log probabilities (infinite if they chose other tokens or alternatives)."""
    if len(got) < len(want):
        return float("inf")
    worst = 0.0
    for g, w in zip(got, want, strict=False):
        if g.token_id != w.token_id:
            return float("inf")
        by_id = dict(zip(g.top_ids, g.top_logprobs, strict=True))
        floor = min(g.top_logprobs, default=0.0)  # an alternative missing from ``got`` is at most this likely there
        diffs = [
            abs(by_id[i] - lp) if i in by_id else max(0.0, lp - floor)
            for i, lp in zip(w.top_ids, w.top_logprobs, strict=True)
        ]
        worst = max(worst, abs(g.logprob - w.logprob), *diffs)
    return worst


def matches_monolithic(got: Sequence[TokenLogprob], want: Sequence[TokenLogprob], atol: float = LOGPROB_ATOL) -> bool:
    """True when the decode side's first log probabilities are the monolithic ones within ``atol``."""
    return logprob_mismatch(got, want) <= atol
