"""Handling a bus message, once for every service: ask, decode, answer with a reply or a typed error, drop garbage.

A client asks with ``ask``: the reply, or the typed error the service answered, ``Unreachable`` when
nobody listens, ``UpstreamTimeout`` past the deadline. A request (a message with a reply inbox) is
answered by ``answer``: the handler's reply, or the
``ErrorReply`` of the ``PrfaasError`` it raised, so typed errors cross the bus intact. A message
that fails to decode is a client error: ``decoded`` counts it and raises ``BadRequest`` (which
``answer`` sends back); ``decoded_or_none`` counts and logs it and the subscription goes on.
"""

from __future__ import annotations

import logging
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
    """Send ``request`` to ``subject`` (trace context in its headers) and return the reply, or raise its typed error."""
    try:
        msg = await nc.request(subject, encode(request), timeout=timeout_s, headers=inject_headers())
    except nats.errors.NoRespondersError as e:
        raise Unreachable(f"{where} is not listening") from e
    except nats.errors.TimeoutError as e:
        raise UpstreamTimeout(f"{where} did not answer within {timeout_s}s") from e
    reply = reply_decoder.decode(msg.data)
    if isinstance(reply, ErrorReply):
        raise error_from_code(reply.code, reply.message)
    return reply


def decoded(decoder: msgspec.msgpack.Decoder, msg: Msg, what: str, bad_messages: Counter) -> T:
    """``msg``'s payload as ``decoder``'s type, or ``BadRequest`` (counted under ``bad_messages{what}``)."""
    try:
        return decoder.decode(msg.data)
    except (msgspec.DecodeError, ValueError) as e:
        bad_messages.labels(what).inc()
        raise BadRequest(f"malformed {what}: {e}") from None


def decoded_or_none(decoder: msgspec.msgpack.Decoder, msg: Msg, what: str, bad_messages: Counter) -> T | None:
    """``msg``'s payload decoded, or None for a malformed one (counted and logged; the subscription goes on)."""
    try:
        return decoded(decoder, msg, what, bad_messages)
    except BadRequest as e:
        log.warning("malformed message dropped", extra={"subject": msg.subject, "error": e.message})
        return None


def decoded_load(msg: Msg, bad_messages: Counter) -> InstanceLoad | None:
    """An ``InstanceLoad`` heartbeat whose site and instance are subject tokens, or None (counted, logged)."""
    load = decoded_or_none(instance_load_decoder, msg, "load", bad_messages)
    if load is None:
        return None
    try:
        subjects.token(load.site, "site")
        subjects.token(load.instance, "instance")
    except ValueError as e:
        bad_messages.labels("load").inc()
        log.warning("malformed message dropped", extra={"subject": msg.subject, "error": str(e)})
        return None
    return load


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
