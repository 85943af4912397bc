"""Read frozen service config from prefixed environment variables; errors name the key."""

from __future__ import annotations

from collections.abc import Mapping

from libs.common.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class EnvReader:
    """Typed access to ``<PREFIX><KEY>`` variables of one mapping (usually ``os.environ``)."""

    def __init__(self, prefix: str, env: Mapping[str, str]) -> None:
        self.prefix = prefix
        self.env = env

    def _raw(self, key: str) -> str | None:
        value = self.env.get(self.prefix + key)
        return None if value is None or value.strip() == "" else value.strip()

    def _bad(self, key: str, raw: str, expected: str) -> ConfigError:
        return ConfigError(f"{self.prefix}{key}={raw!r}: expected {expected}")

    def str(self, key: str, default: str) -> str:
        """A string value."""
        raw = self._raw(key)
        return default if raw is None else raw

    def int(self, key: str, default: int, *, minimum: int | None = None) -> int:
        """An integer, optionally bounded below."""
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise self._bad(key, raw, "an integer") from None
        if minimum is not None and value < minimum:
            raise self._bad(key, raw, f"an integer >= {minimum}")
        return value

    def float(self, key: str, default: float, *, minimum: float | None = None) -> float:
        """A float, optionally bounded below (exclusive of nothing: ``value >= minimum``)."""
        raw = self._raw(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise self._bad(key, raw, "a number") from None
        if minimum is not None and value < minimum:
            raise self._bad(key, raw, f"a number >= {minimum}")
        return value

    def bool(self, key: str, default: bool) -> bool:
        """A boolean (1/0, true/false, yes/no, on/off)."""
        raw = self._raw(key)
        if raw is None:
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise self._bad(key, raw, "true or false")

    def list(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        """A comma-separated list of non-empty strings."""
        raw = self._raw(key)
        if raw is None:
            return default
        return tuple(item.strip() for item in raw.split(",") if item.strip())
