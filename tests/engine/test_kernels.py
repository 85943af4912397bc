"""The numerical kernels against naive per-token references."""

from __future__ import annotations

import numpy as np
import pytest

from libs.engine import attention, delta_rule


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _delta_inputs(rng: np.random.Generator, t_len: int, heads: int = 4, d: int = 32, max_log_decay: float = 1.0):
    q = _unit(rng.standard_normal((t_len, heads, d)))
    k = _unit(rng.standard_normal((t_len, heads, d)))
    v = rng.standard_normal((t_len, heads, d)).astype(np.float32)
    g = (-max_log_decay / (1 + np.exp(-rng.standard_normal((t_len, heads, d)) + 2))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((t_len, heads))))).astype(np.float32)
    return q, k, v, g, beta


def _naive_delta(q, k, v, g, beta, state0):
    """The recurrence token by token in float64."""
    s = state0.astype(np.float64)
    outs = []
    for t in range(len(q)):
        a = np.exp(g[t].astype(np.float64))
        delta = beta[t][:, None] * (v[t] - np.einsum("hkv,hk->hv", s, a * k[t]))
        s = a[..., None] * s + k[t][:, :, None] * delta[:, None, :]
        outs.append(np.einsum("hkv,hk->hv", s, q[t]))
    return np.array(outs), s


@pytest.mark.parametrize("t_len", [1, 63, 64, 200])
def test_chunked_delta_rule_matches_recurrence(t_len: int) -> None:
    """The chunkwise (UT transform) prefill equals the per-token recurrence, outputs and final state."""
    rng = np.random.default_rng(t_len)
    q, k, v, g, beta = _delta_inputs(rng, t_len)
    state0 = (rng.standard_normal((4, 32, 32)) * 0.1).astype(np.float32)
    out, states = delta_rule.chunked_prefill(q, k, v, g, beta, state0, 64)
    ref_out, ref_state = _naive_delta(q, k, v, g, beta, state0)
    assert out.shape == (t_len, 4, 32)
    assert states.shape == (-(-t_len // 64) + 1, 4, 32, 32)
    np.testing.assert_allclose(out, ref_out, atol=2e-5)
    np.testing.assert_allclose(states[-1], ref_state, atol=2e-5)


def test_chunk_boundary_states_are_checkpoints() -> None:
    """Boundary ``n`` of the chunked prefill is the state after exactly ``n`` chunks of tokens."""
    rng = np.random.default_rng(7)
    q, k, v, g, beta = _delta_inputs(rng, 192)
    state0 = np.zeros((4, 32, 32), dtype=np.float32)
    _, states = delta_rule.chunked_prefill(q, k, v, g, beta, state0, 64)
    _, after_two = _naive_delta(q[:128], k[:128], v[:128], g[:128], beta[:128], state0)
    np.testing.assert_allclose(states[2], after_two, atol=2e-5)


def test_strong_decay_stays_finite() -> None:
    """Decay at the configured limit over a whole chunk keeps every exponent inside float32."""
    rng = np.random.default_rng(3)
    q, k, v, _, beta = _delta_inputs(rng, 128)
    g = np.full((128, 4, 32), -0.999, dtype=np.float32)
    out, states = delta_rule.chunked_prefill(q, k, v, g, beta, np.zeros((4, 32, 32), np.float32), 64)
    ref_out, _ = _naive_delta(q, k, v, g, beta, np.zeros((4, 32, 32)))
    assert np.isfinite(states).all()
    np.testing.assert_allclose(out, ref_out, atol=2e-5)


def test_recurrent_step_matches_chunked() -> None:
    """Decode's one-token step continues the chunked prefill's final state exactly as the recurrence."""
    rng = np.random.default_rng(5)
    q, k, v, g, beta = _delta_inputs(rng, 65)
    state0 = np.zeros((4, 32, 32), dtype=np.float32)
    out, states = delta_rule.chunked_prefill(q, k, v, g, beta, state0, 64)
    _, prefix_states = delta_rule.chunked_prefill(q[:64], k[:64], v[:64], g[:64], beta[:64], state0, 64)
    step_out, step_state = delta_rule.recurrent_step(q[64:], k[64:], v[64:], g[64:], beta[64:], prefix_states[-1][None])
    np.testing.assert_allclose(step_out[0], out[64], atol=1e-5)
    np.testing.assert_allclose(step_state[0], states[-1], atol=1e-5)


def test_unit_lower_inverse() -> None:
    """The recursive-doubling inverse of I + strictly-lower equals numpy's general inverse."""
    rng = np.random.default_rng(11)
    strict = np.tril(rng.standard_normal((3, 64, 64)).astype(np.float32) * 0.2, -1)
    inv = delta_rule.unit_lower_inverse(strict.copy())
    np.testing.assert_allclose(inv, np.linalg.inv(strict + np.eye(64)), atol=1e-4)


@pytest.mark.parametrize(("length", "new"), [(700, 700), (1000, 300), (513, 1)])
def test_causal_prefill_matches_naive_softmax(length: int, new: int) -> None:
    """Tiled attention of the last ``new`` positions equals a per-query softmax over earlier keys."""
    rng = np.random.default_rng(length + new)
    q = _unit(rng.standard_normal((new, 4, 32))) * 8
    k = _unit(rng.standard_normal((length, 2, 32)))
    v = rng.standard_normal((length, 2, 32)).astype(np.float32)
    out = attention.causal_prefill(q, k, v).reshape(new, 4, 32)
    start = length - new
    for i in (0, new // 2, new - 1):
        pos = start + i
        for h in range(4):
            s = np.exp(k[: pos + 1, h // 2].astype(np.float64) @ q[i, h])
            np.testing.assert_allclose(out[i, h], (s / s.sum()) @ v[: pos + 1, h // 2], atol=1e-5)
    np.testing.assert_allclose(attention.decode_one(q[-1], k, v), out[-1].reshape(-1), atol=1e-5)
