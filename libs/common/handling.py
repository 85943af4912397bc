"""Handling a bus message, once for every service: ask, decode, answer with a reply or a typed error, drop garbage.

A client asks with ``ask``: the reply, or the typed error the service answered, ``Unreachable`` when
nobody listens, ``UpstreamTimeout`` past the deadline. A request (a message with a reply inbox) is
answered by ``answer``: the handler's reply, or the ``ErrorReply`` of the ``PrfaasError`` it raised,
so typed errors cross the bus intact. A message that fails to decode, or decodes to numbers no
sender makes (negative or not finite) or to strings longer than any name
(``MAX_STRING_CHARS``), is a client error: ``decoded`` counts it and raises ``BadRequest`` (which
``answer`` sends back); ``decoded_or_none`` counts it and the subscription goes on. Both log a
refused kind at most once per ``LOG_EVERY_S`` (with how many went unlogged), so a flood cannot fill
the disk. ``guarded`` keeps a handler's unexpected failure inside it: logged the same way, a request
answered ``internal``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import Counter

from libs.common import subjects
from libs.common.errors import BadRequest, PrfaasError, Unreachable, UpstreamTimeout, error_from_code
from libs.common.messages import ErrorReply, InstanceLoad, encode, instance_load_decoder
from libs.common.telemetry import inject_headers

log = logging.getLogger(__name__)

T = TypeVar("T")


async def ask(
    nc: NatsClient,
    subject: str,
    request: msgspec.Struct,
    reply_decoder: msgspec.msgpack.Decoder,
    timeout_s: float,
    where: str,
) -> msgspec.Struct:
    """Send ``request`` to ``subject`` (trace context in its headers) and return the reply, or raise its typed error
    (a reply that does not decode is an ``internal`` one)."""
    try:
        msg = await nc.request(subject, encode(request), timeout=timeout_s, headers=inject_headers())
    except nats.errors.NoRespondersError as e:
        raise Unreachable(f"{where} is not listening") from e
    except nats.errors.TimeoutError as e:
        raise UpstreamTimeout(f"{where} did not answer within {timeout_s}s") from e
    try:
        reply = reply_decoder.decode(msg.data)
    except msgspec.DecodeError as e:  # a broken or hostile answer: no reply, and nothing the caller did wrong
        raise PrfaasError(f"{where} answered a malformed reply: {str(e)[:200]}") from None
    if isinstance(reply, ErrorReply):
        raise error_from_code(reply.code, reply.message)
    return reply


LOG_EVERY_S = 10.0  # one log line per refused kind this often at most (the counters count every message)
MAX_STRING_CHARS = 16384  # a name, id, subject or error text on the bus; a longer one would be kept or logged
_NUMBER_END = 2**64  # msgpack's integers end here (a seed may use them all); a float past it is no size or time
_MAX_SUBJECT_CHARS = 512  # far under the server's 4 KiB control line, which a longer subject breaks
_PUBLISHABLE = re.compile(r"[^\s.*>\x00-\x1f\x7f]+(\.[^\s.*>\x00-\x1f\x7f]+)*")


class _Throttled:
    """Logs one line per kind at most every ``every_s``, saying how many of that kind went unlogged."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._last: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def warning(self, kind: str, text: str, subject: str, error: str) -> None:
        """Log ``text`` for ``kind`` now, or count it until the next line of that kind."""
        now = time.monotonic()
        if now - self._last.get(kind, -self.every_s) < self.every_s:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        self._last[kind] = now
        unlogged = self._unlogged.pop(kind, 0)
        log.warning(text, extra={"kind": kind, "subject": subject[:200], "error": error[:300], "unlogged": unlogged})


_throttled = _Throttled(LOG_EVERY_S)


def own_bad_messages(name: str, label: str) -> Counter:
    """A bad-message counter in no registry, for a part its service built without passing its own."""
    return Counter(name, "Malformed bus messages", [label], registry=None)


def refuse(subject: str, what: str, error: str, bad_messages: Counter) -> None:
    """Count a refused message under ``bad_messages{what}`` and log it (throttled)."""
    bad_messages.labels(what).inc()
    _throttled.warning(what, "malformed message refused", subject, error)


def check_fields(message: msgspec.Struct, path: str = "") -> None:
    """``BadRequest`` unless every number of ``message`` (and of the Structs it holds) lies in [0, 2**64) and
    every string is at most ``MAX_STRING_CHARS`` long (names, ids, subjects and error texts, never payloads)."""
    for name in message.__struct_fields__:
        value = getattr(message, name)
        if isinstance(value, msgspec.Struct):
            check_fields(value, f"{path}{name}.")
        elif isinstance(value, int | float) and not isinstance(value, bool) and not 0 <= value < _NUMBER_END:
            raise BadRequest(f"{path}{name} must be a finite number in [0, 2**64), got {value!r}")
        elif isinstance(value, str) and len(value) > MAX_STRING_CHARS:
            raise BadRequest(f"{path}{name} is {len(value)} characters long, over {MAX_STRING_CHARS}")


def check_subject(value: str, what: str) -> None:
    """``BadRequest`` unless ``value`` is a subject this service may publish to (no wildcard, space, or 4 KiB line)."""
    if len(value) > _MAX_SUBJECT_CHARS or not _PUBLISHABLE.fullmatch(value):
        raise BadRequest(f"{what} {value[:80]!r} is not a publishable subject")


def decoded(
    decoder: msgspec.msgpack.Decoder,
    msg: Msg,
    what: str,
    bad_messages: Counter,
    check: Callable[[T], None] | None = None,
) -> T:
    """``msg``'s payload as ``decoder``'s type, ``check_fields`` and ``check`` passed; else ``BadRequest`` (counted,
    logged)."""
    try:
        message = decoder.decode(msg.data)
        check_fields(message)
        if check is not None:
            check(message)
    except (msgspec.DecodeError, ValueError, BadRequest) as e:
        error = e.message if isinstance(e, BadRequest) else str(e)
        refuse(msg.subject, what, error, bad_messages)
        raise BadRequest(f"malformed {what}: {error[:300]}") from None
    return message


def decoded_or_none(
    decoder: msgspec.msgpack.Decoder,
    msg: Msg,
    what: str,
    bad_messages: Counter,
    check: Callable[[T], None] | None = None,
) -> T | None:
    """``msg``'s payload as ``decoded`` gives it, or None for a malformed one (counted, logged; the subscription goes on)."""
    try:
        return decoded(decoder, msg, what, bad_messages, check)
    except BadRequest:
        return None


def _sane_load(load: InstanceLoad) -> None:
    """``ValueError`` unless the heartbeat's site and instance are subject tokens and its port is one."""
    subjects.token(load.site, "site")
    subjects.token(load.instance, "instance")
    if load.tcp_port > 65535:
        raise ValueError(f"tcp_port {load.tcp_port} is no port")


def decoded_load(msg: Msg, bad_messages: Counter) -> InstanceLoad | None:
    """An ``InstanceLoad`` heartbeat whose site and instance are subject tokens, or None (counted, logged)."""
    return decoded_or_none(instance_load_decoder, msg, "load", bad_messages, _sane_load)


def guarded(handler: Callable[[Msg], Awaitable[None]]) -> Callable[[Msg], Awaitable[None]]:
    """``handler`` that raises nothing: a failure is logged (throttled) and a request is answered ``internal``."""

    async def handle(msg: Msg) -> None:
        try:
            await handler(msg)
        except Exception as e:  # a handler's bug must not leave its requester waiting out a deadline
            _throttled.warning("unhandled", "message handler failed", msg.subject, repr(e))
            await respond(msg, ErrorReply(code="internal", message=f"the handler failed: {type(e).__name__}"))

    return handle


async def answer(
    msg: Msg, handle: Callable[[], Awaitable[msgspec.Struct]], refused: Callable[[PrfaasError], None] | None = None
) -> None:
    """Reply to ``msg`` with what ``handle()`` returns, or with the ``ErrorReply`` of the typed error it raised."""
    try:
        reply = await handle()
    except PrfaasError as e:
        if refused is not None:
            refused(e)
        reply = ErrorReply(code=e.code, message=e.message)
    await respond(msg, reply)


def counted_refusal(jobs: Counter, what: str) -> Callable[[PrfaasError], None]:
    """What ``answer`` does with a refusal of a job: count it by code under ``jobs`` and log it."""

    def refused(e: PrfaasError) -> None:
        jobs.labels(e.code).inc()
        log.info("%s refused", what, extra={"code": e.code, "error": e.message})

    return refused


async def respond(msg: Msg, reply: msgspec.Struct) -> None:
    """Send ``reply`` to ``msg``'s inbox, if it has one (a reply lost on the way is logged: the caller's deadline ends it)."""
    if not msg.reply:
        return
    try:
        await msg.respond(encode(reply))
    except nats.errors.Error as e:
        log.warning("reply not sent", extra={"subject": msg.subject, "error": repr(e)})
