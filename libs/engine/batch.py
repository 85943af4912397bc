"""Continuous batching of the reference model: requests join and leave a decode batch between steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from libs.common.errors import BadRequest
from libs.engine.sampling import DecodeOutput, Sampler, Sampling, StopRules, token_logprob
from libs.engine.state import RequestState

if TYPE_CHECKING:
    from libs.engine.model import ReferenceModel


class DecodeSequence:
    """One request being decoded: its state, its sampler and its stop rules."""

    def __init__(self, request_id: str, state: RequestState, max_tokens: int, sampling: Sampling, eos_id: int) -> None:
        if state.logits is None:
            raise BadRequest("decode needs a state with logits (a finished prefill)")
        self.request_id = request_id
        self.state = state
        self.sampler = Sampler(sampling)
        self.rules = StopRules(sampling, max_tokens, eos_id)
        self.top_logprobs = sampling.logprobs

    def sample(self) -> tuple[int, DecodeOutput]:
        """The next token, sampled from the last logits, and what the stop rules release with it."""
        logits = self.state.logits
        token = self.sampler.pick(logits)
        logprob = None if self.top_logprobs is None else token_logprob(logits, token, self.top_logprobs)
        return token, self.rules.accept(token, logprob)

    @property
    def finished(self) -> bool:
        """True once a stop rule or the token limit ended the request."""
        return self.rules.finish_reason is not None


def decode_step(model: ReferenceModel, sequences: list[DecodeSequence]) -> list[DecodeOutput]:
    """Sample one token per sequence from its last logits, then feed the unfinished ones together."""
    outputs, fed, fed_tokens = [], [], []
    for seq in sequences:
        token, out = seq.sample()
        outputs.append(out)
        if out.finish_reason is None:
            fed.append(seq.state)
            fed_tokens.append(token)
    if fed:
        model.forward_step(fed, fed_tokens)
    return outputs


class DecodeBatch:
    """Sequences stepping together; add or remove them between steps, finished ones leave by themselves."""

    def __init__(self, model: ReferenceModel) -> None:
        self.model = model
        self.sequences: list[DecodeSequence] = []

    def add(self, sequence: DecodeSequence) -> None:
        """Join the batch at the next step."""
        self.sequences.append(sequence)

    def remove(self, sequence: DecodeSequence) -> None:
        """Leave the batch (for example a cancelled request)."""
        self.sequences.remove(sequence)

    def step(self) -> dict[str, DecodeOutput]:
        """One token for every sequence; returns the released tokens by request id."""
        outputs = decode_step(self.model, self.sequences)
        result = {seq.request_id: out for seq, out in zip(self.sequences, outputs, strict=True)}
        self.sequences = [seq for seq in self.sequences if not seq.finished]
        return result
