"""Choosing tokens (greedy, temperature, top-p with a seeded RNG) and deciding when a request stops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from libs.common.errors import BadRequest
from libs.common.messages import Sampling, TokenLogprob
from libs.engine.tokenizer import ByteTokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class DecodeOutput:
    """Tokens released by one decode step for one request; ``finish_reason`` is set on the last."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per released token when the sampling asks for them


def token_logprob(logits: np.ndarray, token_id: int, top: int) -> TokenLogprob:
    """``token_id``'s log probability under ``logits`` (log-softmax in float64) and the ``top`` most likely ids."""
    z = logits.astype(np.float64)
    z -= z.max()
    logp = z - np.log(np.exp(z).sum())
    top_ids = np.argsort(-logp, kind="stable")[:top]
    return TokenLogprob(
        token_id=token_id,
        logprob=float(logp[token_id]),
        top_ids=tuple(int(i) for i in top_ids),
        top_logprobs=tuple(float(logp[i]) for i in top_ids),
    )


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
        self._pending_logprobs: list[TokenLogprob] = []  # beside ``_pending`` when logprobs are asked for
        self.n_generated = 0
        self.finish_reason: FinishReason | None = None

    def accept(self, token: int, logprob: TokenLogprob | None = None) -> DecodeOutput:
        """Take one sampled token (and its log probability, if asked for) and say which tokens may be released now."""
        self.n_generated += 1
        if token in self._stop_ids:
            return self._finish("stop", len(self._pending))
        self._pending.append(token)
        if logprob is not None:
            self._pending_logprobs.append(logprob)
        for seq in self._stop_seqs:
            if self._pending[-len(seq) :] == seq:
                return self._finish("stop", len(self._pending) - len(seq))
        if self.n_generated >= self._max_tokens:
            return self._finish("length", len(self._pending))
        return self._release(len(self._pending) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest tail of pending tokens that could still start a stop sequence."""
        for n in range(len(self._pending), 0, -1):
            tail = self._pending[-n:]
            if any(len(seq) > n and seq[:n] == tail for seq in self._stop_seqs):
                return n
        return 0

    def _release(self, n: int, reason: FinishReason | None = None) -> DecodeOutput:
        """The first ``n`` pending tokens (and their log probabilities), no longer pending."""
        out = DecodeOutput(self._pending[:n], reason, tuple(self._pending_logprobs[:n]))
        del self._pending[:n], self._pending_logprobs[:n]
        return out

    def _finish(self, reason: FinishReason, released: int) -> DecodeOutput:
        self.finish_reason = reason
        out = self._release(released, reason)
        self._pending.clear()
        self._pending_logprobs.clear()
        return out
