"""Monolithic generation: prefill then decode a request in this process (what cross-site runs are compared with)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from libs.engine.batch import DecodeBatch, DecodeSequence
from libs.engine.model import ReferenceModel
from libs.engine.sampling import Sampling
from libs.engine.state import RequestState


def decode(
    model: ReferenceModel, state: RequestState, max_tokens: int, sampling: Sampling | None = None
) -> Iterator[int]:
    """Tokens generated from a prefilled state (greedy by default), honouring EOS and stop rules; advances ``state``."""
    batch = DecodeBatch(model)
    batch.add(DecodeSequence("decode", state, max_tokens, sampling or Sampling(), model.config.eos_id))
    while batch.sequences:
        for out in batch.step().values():
            yield from out.token_ids


def generate(
    model: ReferenceModel, tokens: Sequence[int] | np.ndarray, max_tokens: int, sampling: Sampling | None = None
) -> list[int]:
    """Prefill then decode ``tokens`` in this process."""
    return list(decode(model, model.prefill_state(tokens), max_tokens, sampling))
