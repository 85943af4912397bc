"""Gated delta rule with per-channel decay (KDA-like): chunkwise prefill and one recurrent step.

Per head, with a state ``S`` of shape (d_k, d_v), decay ``a_t = exp(g_t)`` per key channel
(``g_t <= 0``), write strength ``beta_t`` in (0, 1) and unit-norm ``q_t``, ``k_t``:

    S_t = (I - beta_t k_t k_t^T) diag(a_t) S_{t-1} + beta_t k_t v_t^T,      o_t = S_t^T q_t

Chunkwise form (chunk of C tokens, state S_0 at its start, G_t = cumulative sum of g inside the
chunk): the values actually written, ``delta_t = beta_t (v_t - S_{t-1}^T a_t k_t)``, satisfy the
unit lower-triangular system ``(I + A) Delta = beta (V - K+ S_0)`` with
``A_tj = beta_t (k_t e^{G_t}) . (k_j e^{-G_j})`` for j < t (the UT/WY transform). Solving it once
for all chunks gives ``W`` and ``U`` with ``Delta = U - W S_0``, so the chunk-to-chunk recurrence
is one small matmul per chunk, ``S_{n+1} = M_n S_n + B_n``, and every output follows in batched
matmuls: ``O = (Q+ - P W) S_n + P U`` with ``P_tj = (q_t e^{G_t}) . (k_j e^{-G_j})`` for j <= t.
The exponents stay inside float32 because ``C * max_log_decay <= 80`` (checked by the config).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided


def chunked_prefill(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    beta: np.ndarray,
    state0: np.ndarray,
    chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Outputs (T, H, d_v) and the states at every chunk boundary (n_chunks + 1, H, d_k, d_v).

    ``q``, ``k``, ``g``: (T, H, d_k); ``v``: (T, H, d_v); ``beta``: (T, H); ``state0``: (H, d_k, d_v).
    Boundary ``n`` is the state after ``n * chunk_size`` tokens; the last boundary is the state
    after all T tokens (a partial last chunk is padded with identity steps: no write, no decay).
    Work arrays are head-major, (H, n_chunks, C, d), so each head's chunks are one contiguous run.
    """
    t_len, n_heads, d_k = k.shape
    d_v = v.shape[2]
    c = chunk_size
    n = -(-t_len // c)

    def chunks(x: np.ndarray) -> np.ndarray:
        """(T, H, ...) -> (H, n, C, ...), zero-padded, contiguous."""
        out = np.empty((n_heads, n * c, *x.shape[2:]), dtype=np.float32)
        out[:, :t_len] = x.swapaxes(0, 1)
        out[:, t_len:] = 0.0
        return out.reshape(n_heads, n, c, *x.shape[2:])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    bc = chunks(beta)[..., None]  # (H, n, C, 1)
    cum = np.matmul(np.tril(np.ones((c, c), dtype=np.float32)), chunks(g))  # G_t inside each chunk
    decay = np.exp(cum)

    # Rows 0..C-1: beta_t k_t e^{G_t} (the UT transform's left factor); rows C..2C-1: q_t e^{G_t}.
    kq = np.empty((n_heads, n, 2 * c, d_k), dtype=np.float32)
    np.multiply(kc, decay, out=kq[:, :, :c])
    kq[:, :, :c] *= bc
    np.multiply(qc, decay, out=kq[:, :, c:])
    k_minus_t = np.empty((n_heads, n, d_k, c), dtype=np.float32)  # (k_j e^{-G_j})^T
    np.divide(kc.swapaxes(-1, -2), decay.swapaxes(-1, -2), out=k_minus_t)
    scores = np.matmul(kq, k_minus_t)  # (H, n, 2C, C): A above, P below
    a, p = scores[:, :, :c], scores[:, :, c:]
    a *= np.tril(np.ones((c, c), dtype=np.float32), -1)
    p *= np.tril(np.ones((c, c), dtype=np.float32))

    rhs = np.empty((n_heads, n, c, d_k + d_v), dtype=np.float32)
    rhs[..., :d_k] = kq[:, :, :c]
    np.multiply(vc, bc, out=rhs[..., d_k:])
    wu = np.matmul(unit_lower_inverse(a), rhs)  # [W | U], (H, n, C, d_k + d_v)

    end_decay = decay[:, :, -1, :, None]  # e^{G_end} per key channel, (H, n, d_k, 1)
    mb = np.matmul(k_minus_t, wu)  # K_end = e^{G_end} K-, so [K_end^T W | K_end^T U] = e^{G_end} (K-^T [W | U])
    mb *= end_decay
    m = -mb[..., :d_k]
    m += end_decay * np.eye(d_k, dtype=np.float32)
    m = np.ascontiguousarray(m.swapaxes(0, 1))  # chunk-major for the sequential loop
    b = np.ascontiguousarray(mb[..., d_k:].swapaxes(0, 1))

    states = np.empty((n + 1, n_heads, d_k, d_v), dtype=np.float32)
    states[0] = state0
    for i in range(n):
        np.matmul(m[i], states[i], out=states[i + 1])
        states[i + 1] += b[i]

    pwu = np.matmul(p, wu)  # [P W | P U]
    q_eff = kq[:, :, c:] - pwu[..., :d_k]
    out = np.matmul(q_eff, states[:-1].swapaxes(0, 1))
    out += pwu[..., d_k:]  # (H, n, C, d_v)
    return out.reshape(n_heads, n * c, d_v)[:, :t_len].swapaxes(0, 1), states


def _diagonal_blocks(m: np.ndarray, size: int, row: int, col: int) -> np.ndarray:
    """View of the (size x size) blocks at (row + 2*size*j, col + 2*size*j) of square matrices ``m``."""
    c, item = m.shape[-1], m.itemsize
    return as_strided(
        m[..., row:, col:],
        shape=(*m.shape[:-2], c // (2 * size), size, size),
        strides=(*m.strides[:-2], 2 * size * (c + 1) * item, c * item, item),
    )


def unit_lower_inverse(strict: np.ndarray) -> np.ndarray:
    """Inverse of ``I + strict`` for stacked strictly lower-triangular (C, C) matrices, C a power of two.

    Recursive doubling over diagonal blocks, ``[[A, 0], [X, D]]^-1 = [[A^-1, 0], [-D^-1 X A^-1, D^-1]]``:
    log2(C) rounds of batched matmuls, exact like forward substitution and ~10x faster than
    ``np.linalg.solve`` on many small systems.
    """
    c = strict.shape[-1]
    if c & (c - 1):
        raise ValueError(f"chunk size must be a power of two, got {c}")
    inv = np.zeros_like(strict)
    inv[..., np.arange(c), np.arange(c)] = 1.0
    if c > 1:  # 1x1 diagonal blocks are 1: the first round is a negation
        np.negative(_diagonal_blocks(strict, 1, 1, 0), out=_diagonal_blocks(inv, 1, 1, 0))
    size = 2
    while size < c:
        a_inv = _diagonal_blocks(inv, size, 0, 0)
        d_inv = _diagonal_blocks(inv, size, size, size)
        lower = _diagonal_blocks(strict, size, size, 0)
        _diagonal_blocks(inv, size, size, 0)[...] = -np.matmul(d_inv, np.matmul(lower, a_inv))
        size *= 2
    return inv


def recurrent_step(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    beta: np.ndarray,
    state: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One token for a batch: outputs (B, H, d_v) and new states (B, H, d_k, d_v).

    ``q``, ``k``, ``g``: (B, H, d_k); ``v``: (B, H, d_v); ``beta``: (B, H); ``state``: (B, H, d_k, d_v).
    """
    decay = np.exp(g)
    read = np.matmul((decay * k)[:, :, None, :], state)[:, :, 0, :]  # S^T (a * k)
    delta = beta[..., None] * (v - read)
    new_state = decay[..., None] * state + k[..., :, None] * delta[..., None, :]
    out = np.matmul(q[:, :, None, :], new_state)[:, :, 0, :]
    return out, new_state
