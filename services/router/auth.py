"""API keys held as SHA-256 digests, and per-client token buckets (the router's access control).

A key is never kept in plain text: configured keys are hashed when the config is read, and a
presented key is hashed and compared in constant time against every configured digest. Make a
digest with ``printf '%s' "$KEY" | sha256sum`` (prefix ``sha256:``) or :func:`digest`.
Everything here runs on the event loop; nothing blocks.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

from libs.common.errors import ConfigError, PrfaasError

_PREFIX = "sha256:"
_HEX_CHARS = 64


def digest(key: str) -> str:
    """``sha256:<hex>`` of a key, as ``ROUTER_API_KEY_HASHES`` and ``ROUTER_API_KEYS_FILE`` take it."""
    return _PREFIX + hashlib.sha256(key.encode()).hexdigest()


def _parse_digest(source: str, text: str) -> bytes:
    """The 32 bytes of one ``sha256:<hex>`` item (a ConfigError naming ``source`` otherwise)."""
    hex_part = text[len(_PREFIX) :] if text.startswith(_PREFIX) else ""
    try:
        raw = bytes.fromhex(hex_part)
    except ValueError:
        raw = b""
    if len(hex_part) != _HEX_CHARS or len(raw) != _HEX_CHARS // 2:
        raise ConfigError(f"{source}: {text[:16]!r}... is not of the form sha256:<64 hex digits>")
    return raw


def load_digests(plain: Iterable[str], hashed: Iterable[str], file: str) -> tuple[bytes, ...]:
    """Digests of ``ROUTER_API_KEYS`` (hashed here), ``ROUTER_API_KEY_HASHES`` and ``ROUTER_API_KEYS_FILE`` lines."""
    found = [hashlib.sha256(key.encode()).digest() for key in plain]
    found += [_parse_digest("ROUTER_API_KEY_HASHES", item) for item in hashed]
    if file:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"ROUTER_API_KEYS_FILE={file!r}: {e.strerror}") from None
        for number, line in enumerate(lines, 1):
            item = line.split("#", 1)[0].strip()
            if item:
                found.append(_parse_digest(f"ROUTER_API_KEYS_FILE={file!r} line {number}", item))
    return tuple(dict.fromkeys(found))


def matching_digest(presented: str, digests: tuple[bytes, ...]) -> bytes | None:
    """The configured digest ``presented`` hashes to, or None; every digest is compared (no early exit).

    A header's bytes that are not UTF-8 come back as they were sent (aiohttp decodes with ``surrogateescape``).
    """
    given = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
    found = None
    for candidate in digests:
        if hmac.compare_digest(given, candidate):
            found = candidate
    return found


class RateLimited(PrfaasError):
    """A client went past its request rate (HTTP 429 with ``Retry-After``)."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimiter:
    """A token bucket per client (an API key's digest, or an address when no keys are set).

    ``rate_per_s`` tokens are added each second up to ``burst``; a request takes one. The table keeps
    the ``max_clients`` clients seen last (a client evicted from it starts again with a full bucket).
    """

    def __init__(self, rate_per_s: float, burst: int, max_clients: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()  # client -> (tokens, at)

    def take(self, client: object, now: float) -> float:
        """Take one request from ``client``'s bucket: 0 if allowed, else the seconds until one is allowed."""
        tokens, at = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate_per_s)
        wait_s = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait_s = (1.0 - tokens) / self.rate_per_s
        self._buckets[client] = (tokens, now)
        if len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait_s

    def check(self, client: object, now: float) -> None:
        """RateLimited (with the whole seconds to wait, rounded up) when ``client`` has no request left."""
        wait_s = self.take(client, now)
        if wait_s > 0:
            raise RateLimited(
                f"rate limit reached: {self.rate_per_s:g} requests/s (burst {self.burst}); retry in {wait_s:.2f}s",
                max(1, math.ceil(wait_s)),
            )

    def __len__(self) -> int:
        return len(self._buckets)
