"""Input-length workloads: a truncated log-normal and an empirical histogram of observed lengths.

The throughput model needs, for a threshold t, the offloaded fraction ``p = P(L > t)`` and the
conditional means ``E[L | L > t]`` and ``E[L | L <= t]``; the simulator needs samples. Every
function of t accepts a numpy array so the grid search is vectorised.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from libs.common.errors import BadRequest

_erf = np.frompyfunc(math.erf, 1, 1)


def _phi(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF, elementwise."""
    return 0.5 * (1.0 + np.asarray(_erf(np.asarray(z, dtype=float) / math.sqrt(2.0)), dtype=float))


class Workload(ABC):
    """Distribution of request input lengths (tokens)."""

    min_tokens: int
    max_tokens: int

    @abstractmethod
    def cdf(self, t: np.ndarray | float) -> np.ndarray:
        """P(L <= t)."""

    @abstractmethod
    def partial_mean(self, t: np.ndarray | float) -> np.ndarray:
        """E[L ; L <= t] (the mean restricted to lengths up to t, times their probability)."""

    @abstractmethod
    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` lengths drawn from the distribution (int64)."""

    @abstractmethod
    def describe(self) -> dict:
        """The parameters, for JSON output."""

    @property
    def mean_tokens(self) -> float:
        """E[L]."""
        return float(self.partial_mean(self.max_tokens))

    def tail_fraction(self, t: np.ndarray | float) -> np.ndarray:
        """p = P(L > t)."""
        return 1.0 - self.cdf(t)

    def mean_above(self, t: np.ndarray | float) -> np.ndarray:
        """E[L | L > t] (t itself where nothing lies above)."""
        p = self.tail_fraction(t)
        above = self.mean_tokens - self.partial_mean(t)
        return np.where(p > 1e-12, above / np.maximum(p, 1e-12), np.asarray(t, dtype=float))

    def mean_below(self, t: np.ndarray | float) -> np.ndarray:
        """E[L | L <= t] (t itself where nothing lies below)."""
        q = self.cdf(t)
        return np.where(q > 1e-12, self.partial_mean(t) / np.maximum(q, 1e-12), np.asarray(t, dtype=float))


@dataclass(frozen=True)
class TruncatedLogNormal(Workload):
    """ln L ~ Normal(mu, sigma), truncated to [min_tokens, max_tokens] (the paper's workload)."""

    mu: float
    sigma: float
    min_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        if self.sigma <= 0 or not 0 < self.min_tokens < self.max_tokens:
            raise BadRequest(
                f"lognormal needs sigma > 0 and 0 < min < max, got sigma={self.sigma:g}, "
                f"min={self.min_tokens}, max={self.max_tokens}"
            )

    def _raw_cdf(self, x: np.ndarray) -> np.ndarray:
        return _phi((np.log(x) - self.mu) / self.sigma)

    def _raw_partial(self, x: np.ndarray) -> np.ndarray:
        scale = math.exp(self.mu + self.sigma**2 / 2)
        return scale * _phi((np.log(x) - self.mu - self.sigma**2) / self.sigma)

    def cdf(self, t: np.ndarray | float) -> np.ndarray:
        """P(L <= t) of the truncated distribution."""
        x = np.clip(np.asarray(t, dtype=float), self.min_tokens, self.max_tokens)
        lo, hi = self._raw_cdf(self.min_tokens), self._raw_cdf(self.max_tokens)
        return (self._raw_cdf(x) - lo) / (hi - lo)

    def partial_mean(self, t: np.ndarray | float) -> np.ndarray:
        """E[L ; L <= t] of the truncated distribution."""
        x = np.clip(np.asarray(t, dtype=float), self.min_tokens, self.max_tokens)
        lo, hi = self._raw_cdf(self.min_tokens), self._raw_cdf(self.max_tokens)
        return (self._raw_partial(x) - self._raw_partial(self.min_tokens)) / (hi - lo)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Inverse-CDF sampling restricted to the truncation interval."""
        lo, hi = (float(v) for v in (self._raw_cdf(self.min_tokens), self._raw_cdf(self.max_tokens)))
        u = rng.uniform(lo, hi, n)
        z = _normal_ppf(u)
        return np.clip(np.rint(np.exp(self.mu + self.sigma * z)), self.min_tokens, self.max_tokens).astype(np.int64)

    def describe(self) -> dict:
        """The parameters, for JSON output."""
        return {"kind": "lognormal", "mu": self.mu, "sigma": self.sigma, "min": self.min_tokens, "max": self.max_tokens}


def _normal_ppf(u: np.ndarray) -> np.ndarray:
    """Inverse standard normal CDF (Acklam's rational approximation refined by one Newton step)."""
    u = np.clip(np.asarray(u, dtype=float), 1e-15, 1 - 1e-15)
    a = (
        -3.969683028665376e01,
        2.209460984245205e02,
        -2.759285104469687e02,
        1.383577518672690e02,
        -3.066479806614716e01,
        2.506628277459239e00,
    )
    b = (
        -5.447609879822406e01,
        1.615858368580409e02,
        -1.556989798598866e02,
        6.680131188771972e01,
        -1.328068155288572e01,
    )
    c = (
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e00,
        -2.549732539343734e00,
        4.374664141464968e00,
        2.938163982698783e00,
    )
    d = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e00, 3.754408661907416e00)
    q = np.minimum(u, 1 - u)
    tail = q < 0.02425
    r = np.sqrt(-2 * np.log(np.where(tail, q, 0.5)))
    x_tail = (((((c[0] * r + c[1]) * r + c[2]) * r + c[3]) * r + c[4]) * r + c[5]) / (
        (((d[0] * r + d[1]) * r + d[2]) * r + d[3]) * r + 1
    )
    x_tail = np.where(u < 0.5, x_tail, -x_tail)
    s = u - 0.5
    s2 = s * s
    x_mid = (
        (((((a[0] * s2 + a[1]) * s2 + a[2]) * s2 + a[3]) * s2 + a[4]) * s2 + a[5])
        * s
        / (((((b[0] * s2 + b[1]) * s2 + b[2]) * s2 + b[3]) * s2 + b[4]) * s2 + 1)
    )
    x = np.where(tail, x_tail, x_mid)
    err = _phi(x) - u
    return x - err * math.sqrt(2 * math.pi) * np.exp(x * x / 2)


@dataclass(frozen=True)
class Empirical(Workload):
    """The empirical distribution of observed lengths (e.g. the last hour's uncached lengths)."""

    lengths: np.ndarray = field(repr=False)
    source: str = ""
    min_tokens: int = field(init=False)
    max_tokens: int = field(init=False)
    _cumsum: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        arr = np.sort(np.asarray(self.lengths, dtype=np.int64))
        if arr.size == 0 or arr[0] < 1:
            raise BadRequest(f"an empirical workload needs at least one positive length ({self.source or 'given'})")
        object.__setattr__(self, "lengths", arr)
        object.__setattr__(self, "min_tokens", int(arr[0]))
        object.__setattr__(self, "max_tokens", int(arr[-1]))
        object.__setattr__(self, "_cumsum", np.concatenate([[0.0], np.cumsum(arr, dtype=float)]))

    def cdf(self, t: np.ndarray | float) -> np.ndarray:
        """Fraction of observed lengths <= t."""
        return np.searchsorted(self.lengths, np.asarray(t, dtype=float), side="right") / self.lengths.size

    def partial_mean(self, t: np.ndarray | float) -> np.ndarray:
        """Sum of observed lengths <= t over the number observed."""
        idx = np.searchsorted(self.lengths, np.asarray(t, dtype=float), side="right")
        return self._cumsum[idx] / self.lengths.size

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Resample the observed lengths with replacement."""
        return rng.choice(self.lengths, size=n, replace=True)

    def describe(self) -> dict:
        """Source and summary, for JSON output."""
        return {
            "kind": "empirical",
            "source": self.source,
            "count": int(self.lengths.size),
            "mean": self.mean_tokens,
            "min": self.min_tokens,
            "max": self.max_tokens,
        }


CASE_STUDY_WORKLOAD = TruncatedLogNormal(mu=9.90, sigma=1.00, min_tokens=128, max_tokens=131_072)


_LOGNORMAL_KEYS = ("mu", "sigma", "min", "max")


def parse_workload(spec: str) -> Workload:
    """``lognormal:mu=9.9,sigma=1,min=128,max=131072`` or ``file:lengths.txt`` (one length per line)."""
    kind, _, rest = spec.partition(":")
    if kind == "file":
        return _read_lengths(rest)
    if kind == "lognormal":
        return _parse_lognormal(spec, rest)
    raise BadRequest(f"--workload {spec!r}: expected lognormal:mu=..,sigma=..[,min=..,max=..] or file:PATH")


def _read_lengths(name: str) -> Empirical:
    path = Path(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; it is reported below
            values = np.loadtxt(path, dtype=float, ndmin=1)
    except OSError as e:
        raise BadRequest(f"--workload file {name!r}: {e.strerror or e}") from e
    except ValueError as e:
        raise BadRequest(f"--workload file {name!r}: not one number per line ({e})") from e
    if values.size == 0:
        raise BadRequest(f"--workload file {name!r}: no lengths in it")
    if not np.all(np.isfinite(values)) or values.min() < 1:
        raise BadRequest(f"--workload file {name!r}: every length must be a positive number of tokens")
    return Empirical(lengths=np.rint(values).astype(np.int64), source=str(path))


def _parse_lognormal(spec: str, rest: str) -> TruncatedLogNormal:
    params: dict[str, str] = {}
    for part in filter(None, rest.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in _LOGNORMAL_KEYS:
            raise BadRequest(f"--workload {spec!r}: {part!r} is not one of {'=.., '.join(_LOGNORMAL_KEYS)}=..")
        params[key.strip()] = value
    missing = [key for key in ("mu", "sigma") if key not in params]
    if missing:
        raise BadRequest(f"--workload {spec!r}: missing {' and '.join(missing)}")
    numbers = {}
    for key, value in params.items():
        try:
            numbers[key] = float(value)
        except ValueError:
            numbers[key] = math.nan
        if not math.isfinite(numbers[key]):
            raise BadRequest(f"--workload {spec!r}: {key} must be a finite number, got {value!r}")
    return TruncatedLogNormal(
        mu=numbers["mu"],
        sigma=numbers["sigma"],
        min_tokens=int(numbers.get("min", 1)),
        max_tokens=int(numbers.get("max", 1 << 20)),
    )
