"""One exception tree for the whole system; every error has a stable code."""

from __future__ import annotations


class PrfaasError(Exception):
    """Base of every prfaas error: a stable ``code`` and a human ``message``."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConfigError(PrfaasError):
    """A configuration key is missing or has a bad value (the message names the key)."""

    code = "config"


class BadRequest(PrfaasError):
    """The caller sent something malformed or inconsistent; ``param`` names the offending field, if one does."""

    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message, code=code)
        self.param = param


class Unauthorized(PrfaasError):
    """The caller's API key is missing or wrong (HTTP 401)."""

    code = "invalid_api_key"


class NotFound(PrfaasError):
    """The named object does not exist."""

    code = "not_found"


class NoCapacity(PrfaasError):
    """No instance or buffer can take the work now."""

    code = "no_capacity"


class UpstreamTimeout(PrfaasError):
    """A dependency did not answer within its deadline."""

    code = "upstream_timeout"


class Unreachable(UpstreamTimeout):
    """Nobody listens where the request was sent (no responders): the instance is gone, not slow."""


class IndexUnavailable(PrfaasError):
    """The KV index cannot answer (its store is down); route without cache knowledge."""

    code = "index_unavailable"


class TransferFailed(PrfaasError):
    """A KV transfer could not complete (corrupt, aborted, or out of retries)."""

    code = "transfer_failed"


class MissingBinary(PrfaasError):
    """A server binary the lab needs is not installed."""

    code = "missing_binary"


_BY_CODE: dict[str, type[PrfaasError]] = {
    cls.code: cls
    for cls in (
        PrfaasError,
        ConfigError,
        BadRequest,
        Unauthorized,
        NotFound,
        NoCapacity,
        UpstreamTimeout,
        IndexUnavailable,
        TransferFailed,
        MissingBinary,
    )
}


def error_from_code(code: str, message: str) -> PrfaasError:
    """Rebuild the typed exception for an error code received over the wire."""
    return _BY_CODE.get(code, PrfaasError)(message, code=code)
