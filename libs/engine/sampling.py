"""Choosing tokens (greedy, temperature, top-p with a seeded RNG) and deciding when a request stops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from libs.common.errors import BadRequest
from libs.common.messages import Sampling
from libs.engine.tokenizer import ByteTokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class DecodeOutput:
    """Tokens released by one decode step for one request; ``finish_reason`` is set on the last."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None


class Sampler:
    """Picks one token from logits; with a seed, the same logits give the same tokens in any batch."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self._rng = np.random.default_rng(sampling.seed)

    def pick(self, logits: np.ndarray) -> int:
        """Next token id from a (vocab,) logits vector."""
        s = self.sampling
        if s.temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / s.temperature
        p = np.exp(z - z.max())
        ids = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[ids])
        if s.top_p < 1:
            keep = int(np.searchsorted(cum, s.top_p * cum[-1])) + 1
            ids, cum = ids[:keep], cum[:keep]
        pos = int(np.searchsorted(cum, self._rng.random() * cum[-1], side="right"))
        return int(ids[min(pos, len(ids) - 1)])


class StopRules:
    """Applies EOS, stop tokens, stop sequences and ``max_tokens``; holds back a possible stop prefix."""

    def __init__(self, sampling: Sampling, max_tokens: int, eos_id: int) -> None:
        if max_tokens < 1:
            raise BadRequest(f"max_tokens must be >= 1, got {max_tokens}")
        tokenizer = ByteTokenizer()
        self._stop_seqs = [tokenizer.encode(s, bos=False) for s in sampling.stop]
        self._stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            self._stop_ids.add(eos_id)
        self._max_tokens = max_tokens
        self._pending: list[int] = []
        self.n_generated = 0
        self.finish_reason: FinishReason | None = None

    def accept(self, token: int) -> DecodeOutput:
        """Take one sampled token and say which tokens may be released now."""
        self.n_generated += 1
        if token in self._stop_ids:
            return self._finish("stop", self._pending)
        self._pending.append(token)
        for seq in self._stop_seqs:
            if self._pending[-len(seq) :] == seq:
                return self._finish("stop", self._pending[: -len(seq)])
        if self.n_generated >= self._max_tokens:
            return self._finish("length", self._pending)
        held = self._held_back()
        released = self._pending[: len(self._pending) - held]
        self._pending = self._pending[len(released) :]
        return DecodeOutput(released)

    def _held_back(self) -> int:
        """Length of the longest tail of pending tokens that could still start a stop sequence."""
        for n in range(len(self._pending), 0, -1):
            tail = self._pending[-n:]
            if any(len(seq) > n and seq[:n] == tail for seq in self._stop_seqs):
                return n
        return 0

    def _finish(self, reason: FinishReason, released: list[int]) -> DecodeOutput:
        self.finish_reason = reason
        self._pending = []
        return DecodeOutput(list(released), reason)
