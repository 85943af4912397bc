"""Read frozen service config from prefixed environment variables; errors name the key."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from libs.common import subjects
from libs.common.errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
NATS_SCHEMES = ("nats://", "tls://", "ws://", "wss://")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_URL_SAFE = re.compile(r"^[A-Za-z0-9._~-]+$")  # what a NATS URL's user and password may hold unescaped


class EnvReader:
    """Typed access to ``<PREFIX><KEY>`` variables of one mapping (usually ``os.environ``)."""

    def __init__(self, prefix: str, env: Mapping[str, str]) -> None:
        self.prefix = prefix
        self.env = env

    def _raw(self, key: str) -> str | None:
        value = self.env.get(self.prefix + key)
        return None if value is None or value.strip() == "" else value.strip()

    def _bad(self, key: str, raw: str, expected: str) -> ConfigError:
        return self.error(key, raw, f"expected {expected}")

    def error(self, key: str, value: object, why: str) -> ConfigError:
        """The one shape of a bad setting: ``<PREFIX><KEY>=<value>: <why>``."""
        return ConfigError(f"{self.prefix}{key}={value!r}: {why}")

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

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        """One of ``allowed`` (compared as given)."""
        value = self.str(key, default)
        if value not in allowed:
            raise self._bad(key, value, f"one of {', '.join(allowed)}")
        return value

    def name(self, key: str, default: str) -> str:
        """A site, cluster or instance name: one NATS subject token."""
        value = self.str(key, default)
        try:
            return subjects.token(value, key.lower())
        except ValueError as e:
            raise self.error(key, value, str(e)) from None

    def url(self, key: str, default: str, schemes: tuple[str, ...]) -> str:
        """A URL (or comma-separated URLs) with one of ``schemes``."""
        value = self.str(key, default)
        if not all(u.strip().startswith(schemes) for u in value.split(",")):
            raise self._bad(key, value, f"{' or '.join(schemes)} URLs")
        return value

    def nats_url(self, default: str) -> str:
        """``NATS_URL``: the NATS server(s) to connect to, as ``NATS_USER`` when set (``scheme://user:password@``).

        The password is read from the file ``NATS_PASSWORD_FILE`` or, where a file is awkward (compose),
        from ``NATS_PASSWORD``; never both. User and password must be URL-safe (nats-py does not unescape).
        """
        url = self.url("NATS_URL", default, NATS_SCHEMES)
        user = self._raw("NATS_USER")
        if user is None:
            return url
        if not _URL_SAFE.match(user):
            raise self._bad("NATS_USER", user, "letters, digits, '.', '_', '~' or '-'")
        password = self._nats_password()
        return ",".join(u.strip().replace("://", f"://{user}:{password}@", 1) for u in url.split(",") if u.strip())

    def _nats_password(self) -> str:
        """``NATS_PASSWORD_FILE``'s content (stripped), or ``NATS_PASSWORD``."""
        path, inline = self._raw("NATS_PASSWORD_FILE"), self._raw("NATS_PASSWORD")
        if path is not None and inline is not None:
            raise self.error("NATS_PASSWORD_FILE", path, f"and {self.prefix}NATS_PASSWORD are both set: choose one")
        if path is None and inline is None:
            raise self.error("NATS_USER", self._raw("NATS_USER"), f"needs {self.prefix}NATS_PASSWORD_FILE")
        if path is not None:
            try:
                inline = Path(path).read_text().strip()
            except OSError as e:
                raise self.error("NATS_PASSWORD_FILE", path, f"cannot read it ({e.strerror})") from None
        if not _URL_SAFE.match(inline):
            key = "NATS_PASSWORD_FILE" if path is not None else "NATS_PASSWORD"
            raise self.error(key, path or "(hidden)", "the password must be letters, digits, '.', '_', '~' or '-'")
        return inline

    def log_level(self, default: str) -> str:
        """``LOG_LEVEL``: one of ``LOG_LEVELS``, any case."""
        raw = self.str("LOG_LEVEL", default)
        if raw.upper() not in LOG_LEVELS:
            raise self._bad("LOG_LEVEL", raw, f"one of {', '.join(LOG_LEVELS)}")
        return raw.upper()
