"""The reference model is a witness of the state that crosses sites: every layer and every block moves its output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from libs.engine.generate import decode
from libs.engine.model import ReferenceModel
from libs.engine.sampling import Sampling
from libs.engine.state import RequestState
from libs.engine.witness import LOGPROB_ATOL, logprob_mismatch, matches_monolithic, monolithic_logprobs, state_logprobs

MODEL = ReferenceModel()
CFG = MODEL.config
BS = CFG.block_size
GREEDY_32 = Sampling(ignore_eos=True)
_TEXT = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()


def _prompt(n_tokens: int) -> np.ndarray:
    """``n_tokens`` byte tokens of varied English text (the architecture page)."""
    return np.asarray(MODEL.tokenizer.encode(_TEXT)[:n_tokens], dtype=np.int32)


def _copy(state: RequestState) -> RequestState:
    """A deep copy of a state (mutations below must not touch the original)."""
    return RequestState.from_parts(
        CFG, [p.__class__(p.layer, p.kind, p.name, np.array(p.array)) for p in state.to_parts()]
    )


def _zero_layer(state: RequestState, layer: int) -> None:
    if CFG.is_full_attention(layer):
        state.keys[layer].view[:] = 0.0
        state.values[layer].view[:] = 0.0
    else:
        state.linear[layer][:] = 0.0


@pytest.fixture(scope="module")
def long_prompt() -> tuple[np.ndarray, RequestState, list]:
    """A 2,048-token prompt (32 blocks), its state and its monolithic log probabilities."""
    prompt = _prompt(2048)
    state = MODEL.prefill_state(prompt)
    return prompt, state, state_logprobs(MODEL, _copy(state))


def test_rounding_stays_far_below_the_tolerance(long_prompt):
    """A state rebuilt from cached blocks, decoded in a batch of three, agrees within a tenth of the tolerance."""
    prompt, _, want = long_prompt
    prefix = MODEL.prefill_state(prompt[: 30 * BS])
    prefix.logits = None
    resumed = MODEL.prefill_state(prompt, prefix)
    others = [MODEL.prefill_state(_prompt(n)) for n in (100, 700)]
    from libs.engine.batch import DecodeBatch, DecodeSequence

    batch = DecodeBatch(MODEL)
    for i, st in enumerate([resumed, *others]):
        batch.add(DecodeSequence(str(i), st, 2, Sampling(ignore_eos=True, logprobs=20), CFG.eos_id))
    got = []
    while batch.sequences:
        got += [lp for rid, out in batch.step().items() if rid == "0" for lp in out.logprobs]
    assert logprob_mismatch(got, want) < LOGPROB_ATOL / 10


@pytest.mark.parametrize("layer", range(CFG.n_layers))
def test_every_layers_state_moves_the_next_tokens(long_prompt, layer):
    """Zeroing any one layer's state moves the first step's log probabilities by > 0.3 and changes 32 greedy tokens."""
    prompt, state, want = long_prompt
    broken = _copy(state)
    _zero_layer(broken, layer)
    assert logprob_mismatch(state_logprobs(MODEL, _copy(broken)), want) > 0.3
    assert list(decode(MODEL, broken, 32, GREEDY_32)) != list(decode(MODEL, _copy(state), 32, GREEDY_32))


def test_every_block_of_the_prompt_moves_the_next_token(long_prompt):
    """Zeroing any one block's K/V, or replacing it with another block's, moves the first step by > 10x the tolerance."""
    _, state, want = long_prompt
    smallest = np.inf
    for b in range(len(state.tokens.view) // BS):
        for source in ("zeros", "foreign"):
            broken = _copy(state)
            for layer in CFG.full_layers:
                for rows in (broken.keys[layer].view, broken.values[layer].view):
                    rows[b * BS : (b + 1) * BS] = (
                        0.0 if source == "zeros" else rows[(b + 7) % 32 * BS : ((b + 7) % 32 + 1) * BS]
                    )
            smallest = min(smallest, logprob_mismatch(state_logprobs(MODEL, broken), want))
    assert smallest > 10 * LOGPROB_ATOL


def test_one_token_in_any_block_moves_the_next_token():
    """Changing one byte in any block of a 1,024-token prompt moves the first two steps by > 10x the tolerance."""
    prompt = _prompt(1024)
    want = monolithic_logprobs(MODEL, prompt)
    for b in range(len(prompt) // BS):
        edited = prompt.copy()
        edited[b * BS + 17] = (edited[b * BS + 17] + 1) % 256
        assert logprob_mismatch(monolithic_logprobs(MODEL, edited), want) > 10 * LOGPROB_ATOL, f"block {b}"


# --- negative controls: a checker that passes these is not a checker -------------------------------------


def test_the_checker_passes_an_intact_state(long_prompt):
    """The untouched state matches (the controls below fail for what they break, not for anything else)."""
    _, state, want = long_prompt
    assert matches_monolithic(state_logprobs(MODEL, _copy(state)), want)


def test_the_checker_rejects_a_zeroed_state(long_prompt):
    """Every K/V and linear state zeroed (tokens and logits kept): rejected."""
    _, state, want = long_prompt
    broken = _copy(state)
    for layer in range(CFG.n_layers):
        _zero_layer(broken, layer)
    assert not matches_monolithic(state_logprobs(MODEL, broken), want)


@pytest.mark.parametrize("layer", [0, CFG.full_layers[0], CFG.n_layers - 1])
def test_the_checker_rejects_one_zeroed_layer(long_prompt, layer):
    """One layer's state zeroed (a linear layer, a full-attention layer, the last): rejected."""
    _, state, want = long_prompt
    broken = _copy(state)
    _zero_layer(broken, layer)
    assert not matches_monolithic(state_logprobs(MODEL, broken), want)


def test_the_checker_rejects_a_wrong_block_in_the_middle_of_a_held_prefix(long_prompt):
    """A delta transfer joined to a held prefix whose middle block holds another block's K/V: rejected."""
    prompt, _, want = long_prompt
    held = MODEL.prefill_state(prompt[: 20 * BS])
    held.logits = None
    for layer in CFG.full_layers:
        for rows in (held.keys[layer].view, held.values[layer].view):
            rows[10 * BS : 11 * BS] = rows[3 * BS : 4 * BS]
    assert not matches_monolithic(state_logprobs(MODEL, MODEL.prefill_state(prompt, held)), want)


def test_the_checker_rejects_a_linear_state_from_the_wrong_block_boundary(long_prompt):
    """Linear states taken at the last block boundary before the prompt's end instead of at its end: rejected."""
    prompt = _prompt(2048 - 37)
    want = monolithic_logprobs(MODEL, prompt)
    state = MODEL.prefill_state(prompt)
    boundary = MODEL.prefill_state(prompt[: len(prompt) // BS * BS])
    for layer in CFG.linear_layers:
        state.linear[layer] = boundary.linear[layer]
    assert not matches_monolithic(state_logprobs(MODEL, state), want)
