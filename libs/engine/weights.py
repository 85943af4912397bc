"""Deterministic float32 weights of the reference model, drawn from the config's seed (no download)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from libs.engine.reference_config import ReferenceConfig


@dataclass(frozen=True)
class LinearMixerWeights:
    """A gated delta-rule layer: one fused input projection to q, k, v, decay logits and beta logits."""

    w_in: np.ndarray  # (d_model, 4 * n_heads * head_dim + n_heads)
    b_decay: np.ndarray  # (n_heads * head_dim,) bias of the per-channel decay logits
    b_beta: np.ndarray  # (n_heads,) bias of the write-strength logits
    w_out: np.ndarray  # (n_heads * head_dim, d_model)


@dataclass(frozen=True)
class AttentionWeights:
    """A full-attention (GQA) layer: fused q, k, v projection and the output projection."""

    w_qkv: np.ndarray  # (d_model, (n_heads + 2 * n_kv_heads) * head_dim)
    w_out: np.ndarray  # (n_heads * head_dim, d_model)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer: a token mixer (linear or full attention) and a ReGLU MLP."""

    mixer: LinearMixerWeights | AttentionWeights
    w_gate_up: np.ndarray  # (d_model, 2 * d_ff)
    w_down: np.ndarray  # (d_ff, d_model)


@dataclass(frozen=True)
class ReferenceWeights:
    """All weights; the output head is untied (a tied head on random weights just echoes its input)."""

    embedding: np.ndarray  # (vocab_size, d_model)
    unembedding: np.ndarray  # (d_model, vocab_size), C-contiguous
    output_bias: np.ndarray  # (vocab_size,) favours printable ASCII so that samples read as text
    layers: tuple[LayerWeights, ...]


def init_weights(config: ReferenceConfig) -> ReferenceWeights:
    """Weights drawn from ``config.seed``: equal configs give bitwise-equal weights everywhere."""
    rng = np.random.default_rng(config.seed)
    d, h, hd = config.d_model, config.n_heads, config.head_dim
    residual_scale = 1.0 / np.sqrt(2 * config.n_layers)
    mixer_gain = config.mixer_gain  # mixer outputs are unit-RMS per head (the model's output norm)

    def normal(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    embedding = normal(config.vocab_size, d, 1.0)
    layers = []
    for layer in range(config.n_layers):
        if config.is_full_attention(layer):
            mixer: LinearMixerWeights | AttentionWeights = AttentionWeights(
                w_qkv=normal(d, (h + 2 * config.n_kv_heads) * hd, d**-0.5),
                w_out=normal(h * hd, d, (h * hd) ** -0.5 * mixer_gain),
            )
        else:
            mixer = LinearMixerWeights(
                w_in=normal(d, 4 * h * hd + h, d**-0.5),
                # Per-channel decay biases spread memory time scales from ~2 to ~150 tokens.
                b_decay=rng.uniform(-5.0, 0.0, h * hd).astype(np.float32),
                b_beta=np.zeros(h, dtype=np.float32),
                w_out=normal(h * hd, d, (h * hd) ** -0.5 * mixer_gain),
            )
        layers.append(
            LayerWeights(
                mixer=mixer,
                w_gate_up=normal(d, 2 * config.d_ff, d**-0.5),
                w_down=normal(config.d_ff, d, config.d_ff**-0.5 * residual_scale),
            )
        )
    unembedding = normal(d, config.vocab_size, d**-0.5)
    output_bias = np.full(config.vocab_size, -6.0, dtype=np.float32)
    output_bias[32:127] = 0.0
    output_bias[ord("\n")] = 0.0
    output_bias[config.eos_id] = -3.0
    return ReferenceWeights(embedding=embedding, unembedding=unembedding, output_bias=output_bias, layers=tuple(layers))
