"""Shape of the reference hybrid-attention model (shared by the model and its profile)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.errors import ConfigError
from libs.common.hashing import DEFAULT_BLOCK_SIZE
from libs.engine.tokenizer import BOS_ID, EOS_ID


@dataclass(frozen=True)
class ReferenceConfig:
    """Sizes of the reference model: 3 linear-attention layers per full-attention layer."""

    vocab_size: int = 258  # 256 byte values + BOS + EOS
    d_model: int = 128
    n_layers: int = 8
    n_heads: int = 4
    head_dim: int = 32
    n_kv_heads: int = 2  # GQA in the full-attention layers
    linear_per_full: int = 3  # Kimi-Linear-like 3:1 interleave
    d_ff: int = 512
    block_size: int = DEFAULT_BLOCK_SIZE
    seed: int = 1234
    dtype_bytes: int = 4  # float32
    chunk_size: int = 64  # linear-attention prefill chunk; a power of two dividing block_size
    qk_scale: float = 8.0  # full attention scores are qk_scale * cos(q, k), so |score| <= qk_scale
    max_log_decay: float = 1.0  # per-token log decay of the linear state lies in (-max_log_decay, 0)
    # RMS of each mixer's (attention or linear) contribution to the residual stream, relative to the
    # embedding's 1: large enough that the next token depends on every layer's state and every block.
    mixer_gain: float = 0.5
    max_prompt_tokens: int = 32768  # longest prompt a gateway accepts (no positions: a serving limit)

    def __post_init__(self) -> None:
        if self.block_size % self.chunk_size or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(
                f"chunk_size={self.chunk_size} must be a power of two dividing block_size={self.block_size}"
            )
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.chunk_size * self.max_log_decay > 80:  # exp(+-80) stays inside float32
            raise ConfigError(f"chunk_size * max_log_decay = {self.chunk_size * self.max_log_decay} exceeds 80")
        if not 0 < self.mixer_gain <= 4:
            raise ConfigError(f"mixer_gain={self.mixer_gain} must lie in (0, 4]")
        if not 0 < self.qk_scale <= 64:  # a sum of a million exp(qk_scale) stays inside float32
            raise ConfigError(f"qk_scale={self.qk_scale} must lie in (0, 64]")

    @property
    def bos_id(self) -> int:
        """Token id of beginning-of-sequence (after the 256 byte values)."""
        return BOS_ID

    @property
    def eos_id(self) -> int:
        """Token id of end-of-sequence."""
        return EOS_ID

    def is_full_attention(self, layer: int) -> bool:
        """True for the full-attention layers (every ``linear_per_full + 1``-th layer)."""
        return (layer + 1) % (self.linear_per_full + 1) == 0

    @property
    def full_layers(self) -> tuple[int, ...]:
        """Indices of the full-attention layers."""
        return tuple(i for i in range(self.n_layers) if self.is_full_attention(i))

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """Indices of the linear-attention layers."""
        return tuple(i for i in range(self.n_layers) if not self.is_full_attention(i))

    @property
    def attn_kv_bytes_per_token(self) -> int:
        """K and V bytes per token summed over the full-attention layers."""
        return len(self.full_layers) * 2 * self.n_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def linear_state_bytes(self) -> int:
        """Fixed recurrent state bytes summed over the linear layers (one head_dim^2 matrix per head)."""
        return len(self.linear_layers) * self.n_heads * self.head_dim * self.head_dim * self.dtype_bytes
