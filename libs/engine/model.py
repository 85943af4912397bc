"""The reference hybrid-attention model: layer-wise prefill that streams state, and batched decode steps.

Each layer is ``x += mixer(rms(x)); x += reglu(rms(x))`` (ReGLU: ``relu(x W_g) * (x W_u)``). Mixers are gated delta-rule linear
attention (per-channel decay, KDA-like; see ``delta_rule``) in 3 of every 4 layers and causal GQA
full attention without positional encoding (like Kimi Linear's MLA layers; see ``attention``) in
the others. Each mixer's output is normalised per head (unit RMS, as Gated DeltaNet and Kimi
Linear do) before its output projection, so what attention and the recurrence read from the state
reaches the residual stream at ``mixer_gain`` whatever the prompt's length: the next token depends on
every layer's state and on every block of the prompt (tests/engine/test_witness.py pins it). Logits
come from an untied output head.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from libs.common.errors import BadRequest
from libs.common.state_parts import StatePart
from libs.engine import attention, delta_rule
from libs.engine.reference_config import ReferenceConfig
from libs.engine.state import RequestState
from libs.engine.tokenizer import ByteTokenizer
from libs.engine.weights import AttentionWeights, LayerWeights, LinearMixerWeights, ReferenceWeights, init_weights

_EPS = 1e-6
_MLP_ROWS = 512  # MLP row tile: the (512, 2 * d_ff) hidden activations (2 MiB) stay in L2
_SLAB_ROWS = 512  # linear-layer slab: its chunked work arrays stay in cache (~20% faster than whole prompts)


@dataclass(frozen=True)
class LayerResult:
    """One finished layer of a prefill: its transfer parts and, for linear layers, block checkpoints.

    ``checkpoints`` holds the linear state after block ``b`` as part ``ckpt.<b>`` for every block
    boundary the prefill crossed (views, no copies). The head (``layer == n_layers``) carries the
    tokens and the last logits.
    """

    layer: int
    parts: list[StatePart]
    checkpoints: list[StatePart]


def _rms(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` scaled to unit root-mean-square."""
    ms = np.einsum("td,td->t", x, x) / np.float32(x.shape[1])
    return x * (1.0 / np.sqrt(ms + np.float32(_EPS)))[:, None]


def _unit(x: np.ndarray, length: float = 1.0) -> np.ndarray:
    """Vectors along the last axis scaled to ``length`` (a new array)."""
    norm = np.sqrt(np.einsum("...d,...d->...", x, x) + np.float32(_EPS))
    return x * (np.float32(length) / norm)[..., None]


def _unit_inplace(x: np.ndarray) -> np.ndarray:
    """``x`` with its vectors along the last axis scaled to unit length in place (``_unit`` without a copy)."""
    norm = np.sqrt(np.einsum("...d,...d->...", x, x) + np.float32(_EPS))
    x /= norm[..., None]
    return x


def _head_norm(o: np.ndarray, n_heads: int) -> np.ndarray:
    """Mixer outputs (rows, n_heads * d) with each head's vector scaled to unit RMS, in place (as Gated DeltaNet's output norm)."""
    heads = o.reshape(len(o), n_heads, -1)
    ms = np.einsum("thd,thd->th", heads, heads) / np.float32(heads.shape[2])
    heads *= (1.0 / np.sqrt(ms + np.float32(_EPS)))[..., None]
    return o


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class ReferenceModel:
    """A small hybrid model (numpy float32) whose state has both kinds PrfaaS moves: KV and linear state."""

    def __init__(self, config: ReferenceConfig | None = None, weights: ReferenceWeights | None = None) -> None:
        self.config = config or ReferenceConfig()
        self.weights = weights or init_weights(self.config)
        self.tokenizer = ByteTokenizer()

    # --- prefill ------------------------------------------------------------------------------

    def prefill(
        self, tokens: Sequence[int] | np.ndarray, prefix_state: RequestState | None = None
    ) -> Iterator[LayerResult]:
        """Run the prompt layer by layer, yielding each layer's state as soon as it is done, then the head.

        ``prefix_state`` (from cached blocks) covers the first ``k * block_size`` tokens of
        ``tokens``; only the rest is computed.
        """
        cfg = self.config
        toks = self.check_tokens(tokens)
        start = 0 if prefix_state is None else self._check_prefix(toks, prefix_state)
        x = self.weights.embedding[toks[start:]]
        for layer, lw in enumerate(self.weights.layers):
            if isinstance(lw.mixer, AttentionWeights):
                prefix_kv = (
                    None if prefix_state is None else (prefix_state.keys[layer].view, prefix_state.values[layer].view)
                )
                yield self._attention_prefill(layer, lw, x, prefix_kv)
            else:
                state0 = None if prefix_state is None else prefix_state.linear[layer]
                yield self._linear_prefill(layer, lw, x, state0, start)
        logits = (_rms(x[-1:]) @ self.weights.unembedding)[0] + self.weights.output_bias
        head = cfg.n_layers
        yield LayerResult(
            head,
            [StatePart(head, "attn_kv", "tokens", toks), StatePart(head, "linear_state", "logits", logits)],
            [],
        )

    def prefill_state(
        self, tokens: Sequence[int] | np.ndarray, prefix_state: RequestState | None = None
    ) -> RequestState:
        """Run the whole prefill and return the request state decode starts from."""
        parts = [p for result in self.prefill(tokens, prefix_state) for p in result.parts]
        return RequestState.from_parts(self.config, parts)

    def check_tokens(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """The prompt as a contiguous int32 array, or ``BadRequest`` if it is empty or out of vocabulary."""
        toks = np.asarray(tokens)
        if toks.ndim != 1 or toks.size == 0:
            raise BadRequest("a prompt needs at least one token")
        if toks.dtype.kind not in "iu" or int(toks.min()) < 0 or int(toks.max()) >= self.config.vocab_size:
            raise BadRequest(f"token ids must be integers in [0, {self.config.vocab_size})")
        return np.ascontiguousarray(toks, dtype=np.int32)

    def _check_prefix(self, toks: np.ndarray, prefix: RequestState) -> int:
        start = prefix.n_tokens
        if start % self.config.block_size or start >= len(toks):
            raise BadRequest(f"a prefix of {start} tokens is not a whole number of blocks shorter than the prompt")
        if not np.array_equal(prefix.tokens.view, toks[:start]):
            raise BadRequest("the prefix state belongs to other tokens")
        return start

    def _attention_prefill(
        self, layer: int, lw: LayerWeights, x: np.ndarray, prefix_kv: tuple[np.ndarray, np.ndarray] | None
    ) -> LayerResult:
        """A full-attention layer over all rows of ``x`` (in place), keys and values after any prefix."""
        cfg = self.config
        q, k, v = self._qkv(_rms(x) @ lw.mixer.w_qkv, len(x))
        if prefix_kv is not None:
            k = np.concatenate([prefix_kv[0], k])
            v = np.concatenate([prefix_kv[1], v])
        x += _head_norm(attention.causal_prefill(q, k, v), cfg.n_heads) @ lw.mixer.w_out
        self._mlp(x, lw)
        return LayerResult(layer, [StatePart(layer, "attn_kv", "k", k), StatePart(layer, "attn_kv", "v", v)], [])

    def _qkv(self, proj: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split a fused projection into scaled unit queries, unit keys and values."""
        cfg = self.config
        hd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        q = _unit(proj[:, :hd].reshape(rows, cfg.n_heads, cfg.head_dim), cfg.qk_scale)
        k = _unit(proj[:, hd : hd + kvd].reshape(rows, cfg.n_kv_heads, cfg.head_dim))
        v = np.ascontiguousarray(proj[:, hd + kvd :].reshape(rows, cfg.n_kv_heads, cfg.head_dim))
        return q, k, v

    def _linear_inputs(self, w: LinearMixerWeights, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """q, k (unit), v, log decay g and beta of a gated delta-rule layer, each (rows, heads, ...), C-contiguous.

        q, k, v and the decay logits come out of one matmul against the four column blocks of
        ``w_in`` stacked, so each is its own contiguous array and the elementwise work runs at full speed.
        """
        cfg = self.config
        rows, h, d = len(x), cfg.n_heads, cfg.head_dim
        hd = h * d
        xr = _rms(x)
        qkvg = np.matmul(xr, w.w_in[:, : 4 * hd].reshape(-1, 4, hd).transpose(1, 0, 2))
        _unit_inplace(qkvg[:2].reshape(2, rows, h, d))
        q, k, v, g = (part.reshape(rows, h, d) for part in qkvg)
        np.subtract(-w.b_decay.reshape(h, d), g, out=g)  # g = -max_log_decay * sigmoid(.), in place
        np.exp(g, out=g)
        g += 1.0
        np.divide(np.float32(-cfg.max_log_decay), g, out=g)
        beta = _sigmoid(xr @ w.w_in[:, 4 * hd :] + w.b_beta)
        return q, k, v, g, beta

    def _linear_prefill(
        self, layer: int, lw: LayerWeights, x: np.ndarray, state0: np.ndarray | None, start: int
    ) -> LayerResult:
        """A gated delta-rule layer (in place), one slab of rows at a time with the state carried across.

        Every row's mixer and MLP depend only on that row and the carried state, so a slab runs
        the whole layer while its work arrays stay in cache.
        """
        cfg = self.config
        c = cfg.chunk_size
        states = np.empty((-(-len(x) // c) + 1, cfg.n_heads, cfg.head_dim, cfg.head_dim), dtype=np.float32)
        states[0] = 0.0 if state0 is None else state0
        slab = max(c, _SLAB_ROWS // c * c)
        for r0 in range(0, len(x), slab):
            xs = x[r0 : r0 + slab]
            q, k, v, g, beta = self._linear_inputs(lw.mixer, xs)
            out, slab_states = delta_rule.chunked_prefill(q, k, v, g, beta, states[r0 // c], c)
            states[r0 // c + 1 : r0 // c + len(slab_states)] = slab_states[1:]
            xs += _head_norm(out.reshape(len(xs), -1), cfg.n_heads) @ lw.mixer.w_out
            self._mlp(xs, lw)
        bs = cfg.block_size
        end = start + len(x)
        checkpoints = [
            StatePart(layer, "linear_state", f"ckpt.{b}", states[(b * bs - start) // c])
            for b in range(start // bs + 1, end // bs + 1)
        ]
        return LayerResult(layer, [StatePart(layer, "linear_state", "state", states[-1])], checkpoints)

    def _mlp(self, x: np.ndarray, w: LayerWeights) -> None:
        """ReGLU MLP with residual, in place, one row tile at a time."""
        f = self.config.d_ff
        for r0 in range(0, len(x), _MLP_ROWS):
            xs = x[r0 : r0 + _MLP_ROWS]
            gate_up = w.w_gate_up.T @ _rms(xs).T  # transposed, (2 * d_ff, rows): gate and up each contiguous
            gate = gate_up[:f]
            np.maximum(gate, 0.0, out=gate)
            gate *= gate_up[f:]
            xs += gate.T @ w.w_down

    # --- decode -------------------------------------------------------------------------------

    def forward_step(self, states: list[RequestState], token_ids: Sequence[int]) -> None:
        """Feed one token to each state (a batch), appending KV and updating linear states and logits."""
        cfg = self.config
        toks = np.asarray(token_ids, dtype=np.int32)
        x = self.weights.embedding[toks]
        batch = len(states)
        for layer, lw in enumerate(self.weights.layers):
            if isinstance(lw.mixer, AttentionWeights):
                q, k, v = self._qkv(_rms(x) @ lw.mixer.w_qkv, batch)
                out = np.empty((batch, cfg.n_heads * cfg.head_dim), dtype=np.float32)
                for i, st in enumerate(states):
                    st.keys[layer].append(k[i])
                    st.values[layer].append(v[i])
                    out[i] = attention.decode_one(q[i], st.keys[layer].view, st.values[layer].view)
            else:
                q, k, v, g, beta = self._linear_inputs(lw.mixer, x)
                s = np.stack([st.linear[layer] for st in states])
                out, s = delta_rule.recurrent_step(q, k, v, g, beta, s)
                for i, st in enumerate(states):
                    st.linear[layer] = s[i]
                out = out.reshape(batch, -1)
            x += _head_norm(out, cfg.n_heads) @ lw.mixer.w_out
            self._mlp(x, lw)
        logits = _rms(x) @ self.weights.unembedding + self.weights.output_bias
        for i, st in enumerate(states):
            st.tokens.append(toks[i])
            st.logits = logits[i]
