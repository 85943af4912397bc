"""A request's state in the reference model, and its exact conversion to and from StateParts.

Parts of one request (``T`` tokens so far; shapes in elements):
- full-attention layer ``l``: ``(l, "attn_kv", "k")`` and ``(l, "attn_kv", "v")``, float32
  (T, n_kv_heads, head_dim); keys are unit vectors.
- linear-attention layer ``l``: ``(l, "linear_state", "state")``, float32 (n_heads, d_k, d_v),
  the recurrent state after all T tokens.
- the head, ``layer == n_layers``: ``(n_layers, "attn_kv", "tokens")``, int32 (T,), every token
  id so far (grows per token like KV), and ``(n_layers, "linear_state", "logits")``, float32
  (vocab_size,), the logits after the last token (valid at that exact position only).
Block-boundary checkpoints of the linear state (``"ckpt.<b>"``) feed the prefix cache; they are
not part of a request's state and are not transferred.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from libs.common.errors import BadRequest
from libs.common.state_parts import PartSpec, StatePart
from libs.engine.reference_config import ReferenceConfig


def plan_parts(config: ReferenceConfig, n_tokens: int, skip_tokens: int = 0) -> list[PartSpec]:
    """Specs of every part of a request of ``n_tokens`` tokens, in the order prefill emits them.

    With ``skip_tokens``, K and V cover only tokens ``skip_tokens..n_tokens-1`` (the receiver
    holds the rest); the tokens, logits and linear states are always whole.
    """
    kv_shape = (n_tokens - skip_tokens, config.n_kv_heads, config.head_dim)
    specs: list[PartSpec] = []
    for layer in range(config.n_layers):
        if config.is_full_attention(layer):
            specs += [PartSpec(layer=layer, kind="attn_kv", name=n, shape=kv_shape, dtype="float32") for n in "kv"]
        else:
            shape = (config.n_heads, config.head_dim, config.head_dim)
            specs.append(PartSpec(layer=layer, kind="linear_state", name="state", shape=shape, dtype="float32"))
    head = config.n_layers
    specs.append(PartSpec(layer=head, kind="attn_kv", name="tokens", shape=(n_tokens,), dtype="int32"))
    specs.append(PartSpec(layer=head, kind="linear_state", name="logits", shape=(config.vocab_size,), dtype="float32"))
    return specs


class GrowingRows:
    """Rows appended one at a time with amortised doubling; ``view`` is always C-contiguous."""

    def __init__(self, initial: np.ndarray) -> None:
        self._buf = initial
        self.n = len(initial)

    @property
    def view(self) -> np.ndarray:
        """The rows so far (a view, no copy)."""
        return self._buf[: self.n]

    def append(self, row: np.ndarray | int) -> None:
        """Add one row, reallocating to twice the size when full."""
        if self.n == len(self._buf) or not self._buf.flags.writeable:
            grown = np.empty((max(2 * self.n, 64), *self._buf.shape[1:]), dtype=self._buf.dtype)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n] = row
        self.n += 1


class RequestState:
    """Everything decode needs to continue a request: KV, linear states, tokens, last logits."""

    def __init__(
        self,
        config: ReferenceConfig,
        tokens: np.ndarray,
        keys: dict[int, np.ndarray],
        values: dict[int, np.ndarray],
        linear: dict[int, np.ndarray],
        logits: np.ndarray | None,
    ) -> None:
        self.config = config
        self.tokens = GrowingRows(tokens)
        self.keys = {layer: GrowingRows(a) for layer, a in keys.items()}
        self.values = {layer: GrowingRows(a) for layer, a in values.items()}
        self.linear = linear
        self.logits = logits

    @property
    def n_tokens(self) -> int:
        """Tokens covered by the state."""
        return self.tokens.n

    def layer_parts(self, layer: int) -> list[StatePart]:
        """Parts of one layer (or of the head when ``layer == n_layers``), as views."""
        cfg = self.config
        if layer == cfg.n_layers:
            if self.logits is None:
                raise BadRequest("a prefix state has no logits to send")
            return [
                StatePart(layer, "attn_kv", "tokens", self.tokens.view),
                StatePart(layer, "linear_state", "logits", self.logits),
            ]
        if cfg.is_full_attention(layer):
            return [
                StatePart(layer, "attn_kv", "k", self.keys[layer].view),
                StatePart(layer, "attn_kv", "v", self.values[layer].view),
            ]
        return [StatePart(layer, "linear_state", "state", self.linear[layer])]

    def to_parts(self) -> list[StatePart]:
        """The whole state as parts (views of the state's arrays, no copies)."""
        return [p for layer in range(self.config.n_layers + 1) for p in self.layer_parts(layer)]

    @classmethod
    def from_parts(cls, config: ReferenceConfig, parts: Iterable[StatePart]) -> RequestState:
        """Rebuild a state from parts (arrays are used as they are; read-only buffers are fine)."""
        by_key = {p.key: p.array for p in parts}
        n_tokens = len(by_key.get(f"{config.n_layers}/attn_kv/tokens", ()))
        arrays = {}
        for spec in plan_parts(config, n_tokens):
            array = by_key.pop(spec.key, None)
            if array is None:
                raise BadRequest(f"state part {spec.key} is missing")
            if array.shape != spec.shape or array.dtype != np.dtype(spec.dtype):
                raise BadRequest(
                    f"state part {spec.key} has shape {array.shape} {array.dtype}, expected {spec.shape} {spec.dtype}"
                )
            arrays[spec.key] = array
        if by_key:
            raise BadRequest(f"unexpected state parts: {sorted(by_key)}")
        head = config.n_layers
        return cls(
            config,
            tokens=arrays[f"{head}/attn_kv/tokens"],
            keys={layer: arrays[f"{layer}/attn_kv/k"] for layer in config.full_layers},
            values={layer: arrays[f"{layer}/attn_kv/v"] for layer in config.full_layers},
            linear={layer: arrays[f"{layer}/linear_state/state"] for layer in config.linear_layers},
            logits=arrays[f"{head}/linear_state/logits"],
        )
