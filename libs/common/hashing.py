"""Chained 64-bit block hashes over token ids, stable everywhere and vectorised.

A prompt is cut into full blocks of ``block_size`` tokens (a trailing partial block is not
hashed). Block ``i`` is named by ``h_i = H(h_{i-1}, tokens_i)`` with ``h_{-1} = root``, so equal
prefixes give equal hashes at every site, in every process, on every Python version.

Definition (all arithmetic modulo 2**64; ``fmix`` is MurmurHash3's 64-bit finaliser, a
bijection):
    m(x)          = ((x * C1) ^ ((x * C1) >> 32)) * C2
    c(tokens)     = fmix(sum_j m(tok_j ^ ((j + 1) * K)) ^ len(tokens))
    H(parent, ts) = fmix(fmix^-1(parent) * P + c(ts))
Because the chain is linear before the final ``fmix``, a whole prompt is hashed with a cumulative
sum instead of a Python loop per block. The hash is for routing and cache naming among trusted
parties; it is not a cryptographic digest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_BLOCK_SIZE = 64
ROOT_HASH = 0

_M64 = (1 << 64) - 1
_C1 = 0xFF51AFD7ED558CCD
_C2 = 0xC4CEB9FE1A85EC53
_C1_INV = pow(_C1, -1, 1 << 64)
_C2_INV = pow(_C2, -1, 1 << 64)
_K = 0x9E3779B97F4A7C15  # position key (golden ratio)
_P = 0x100000001B3 * 2 + 1  # odd chain multiplier, invertible modulo 2**64
_Q = pow(_P, -1, 1 << 64)

_U64 = np.uint64


def _fmix(x: np.ndarray) -> np.ndarray:
    """MurmurHash3 fmix64 on a uint64 array (in place on a copy)."""
    x = x.copy()
    x ^= x >> _U64(33)
    x *= _U64(_C1)
    x ^= x >> _U64(33)
    x *= _U64(_C2)
    x ^= x >> _U64(33)
    return x


def _fmix_inv(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_fmix`."""
    x = x.copy()
    x ^= x >> _U64(33)
    x *= _U64(_C2_INV)
    x ^= x >> _U64(33)
    x *= _U64(_C1_INV)
    x ^= x >> _U64(33)
    return x


class _Powers:
    """Growable tables of P**i and Q**i modulo 2**64."""

    def __init__(self) -> None:
        self.p = np.ones(1, dtype=np.uint64)
        self.q = np.ones(1, dtype=np.uint64)

    def upto(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (P**0..P**(n-1), Q**0..Q**(n-1))."""
        if n > len(self.p):
            size = max(n, 2 * len(self.p))
            self.p = np.cumprod(np.full(size, _P, dtype=np.uint64), dtype=np.uint64) * _U64(_Q)
            self.q = np.cumprod(np.full(size, _Q, dtype=np.uint64), dtype=np.uint64) * _U64(_P)
        return self.p[:n], self.q[:n]


_POWERS = _Powers()
_POSITION_KEYS: dict[int, np.ndarray] = {}


def _position_keys(block_size: int) -> np.ndarray:
    keys = _POSITION_KEYS.get(block_size)
    if keys is None:
        keys = np.arange(1, block_size + 1, dtype=np.uint64) * _U64(_K)
        _POSITION_KEYS[block_size] = keys
    return keys


def _as_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or int(arr.min()) < 0 or int(arr.max()) > 0xFFFFFFFF):
        raise ValueError("token ids must be integers in [0, 2**32)")
    return arr.astype(np.uint64, copy=False)


def _block_contents(blocks: np.ndarray) -> np.ndarray:
    """c(tokens) for each row of a (n, block_size) uint64 array."""
    n, size = blocks.shape
    mixed = blocks ^ _position_keys(size)
    mixed *= _U64(_C1)
    mixed ^= mixed >> _U64(32)
    mixed *= _U64(_C2)
    sums = mixed.sum(axis=1, dtype=np.uint64)
    return _fmix(sums ^ _U64(size))


def block_hashes(
    tokens: Sequence[int] | np.ndarray,
    block_size: int = DEFAULT_BLOCK_SIZE,
    parent: int = ROOT_HASH,
) -> np.ndarray:
    """Hashes (uint64 array) of every full block of ``tokens``, chained from ``parent``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    arr = _as_tokens(tokens)
    n = arr.size // block_size
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    contents = _block_contents(arr[: n * block_size].reshape(n, block_size))
    p_pow, q_pow = _POWERS.upto(n)
    start = (int(_fmix_inv(np.array([parent & _M64], dtype=np.uint64))[0]) * _P) & _M64
    acc = np.cumsum(contents * q_pow, dtype=np.uint64)
    acc += _U64(start)
    chain = acc * p_pow
    return _fmix(chain)


def block_hash(parent: int, tokens: Sequence[int] | np.ndarray) -> int:
    """Hash of one block of any length chained from ``parent`` (equals :func:`block_hashes`)."""
    arr = _as_tokens(tokens)
    if arr.size == 0:
        raise ValueError("a block needs at least one token")
    return int(block_hashes(arr, block_size=arr.size, parent=parent)[0])


def hash_list(tokens: Sequence[int] | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE) -> list[int]:
    """Block hashes of a prompt as Python ints (what messages carry)."""
    return block_hashes(tokens, block_size).tolist()


def extend_hash_list(
    known: Sequence[int], tokens: Sequence[int] | np.ndarray, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[int]:
    """``hash_list(tokens, block_size)`` given ``known``, the hashes of its first blocks: only the rest is hashed."""
    done = len(known) * block_size
    parent = known[-1] if known else ROOT_HASH
    return [*known, *block_hashes(np.asarray(tokens)[done:], block_size, parent).tolist()]
