"""NATS connection and idempotent JetStream setup with deadlines and retries."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import nats
from nats.aio.client import Client as NatsClient
from nats.js import api
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError

from libs.common.errors import UpstreamTimeout

log = logging.getLogger(__name__)

# JetStream API errors that mean "the meta leader or stream leader is not ready yet".
_NOT_READY = (ServiceUnavailableError, asyncio.TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError)
_USERINFO = re.compile(r"://([^/@:]*)(?::[^/@]*)?@")


def redact(url: str) -> str:
    """``url`` without its credentials (``nats://user:password@host`` -> ``nats://user:***@host``)."""
    return _USERINFO.sub(lambda m: f"://{m.group(1)}:***@", url)


async def connect(
    url: str | list[str],
    *,
    name: str,
    connect_timeout_s: float = 5.0,
    reconnect_wait_s: float = 0.5,
    max_reconnect_attempts: int = -1,
) -> NatsClient:
    """Connect to NATS: the first connection must succeed within ``connect_timeout_s`` (retrying
    meanwhile); later disconnections reconnect ``max_reconnect_attempts`` times (-1: forever).

    A URL may carry a user and password (``nats://user:password@host:port``, as
    ``EnvReader.nats_url`` builds it); errors show it redacted."""
    servers = [url] if isinstance(url, str) else list(url)
    connected = False
    first_errors: list[Exception] = []

    async def _error_cb(exc: Exception) -> None:
        if connected:
            log.warning("nats error", extra={"client": name, "error": repr(exc)})
        else:
            first_errors.append(exc)

    async def _disconnected_cb() -> None:
        log.info("nats disconnected", extra={"client": name})

    async def _reconnected_cb() -> None:
        log.info("nats reconnected", extra={"client": name})

    try:
        async with asyncio.timeout(connect_timeout_s):
            nc = await nats.connect(
                servers=servers,
                name=name,
                connect_timeout=min(2.0, connect_timeout_s),
                reconnect_time_wait=reconnect_wait_s,
                max_reconnect_attempts=max_reconnect_attempts,
                allow_reconnect=True,
                error_cb=_error_cb,
                disconnected_cb=_disconnected_cb,
                reconnected_cb=_reconnected_cb,
            )
    except (OSError, nats.errors.Error, TimeoutError) as e:
        refused = [err for err in first_errors if "authorization violation" in str(err).lower()]
        cause = refused[-1] if refused else first_errors[-1] if first_errors else e  # a refused login says so
        raise UpstreamTimeout(
            f"cannot connect to NATS at {', '.join(map(redact, servers))} within {connect_timeout_s}s: {cause!r}"
        ) from e
    connected = True
    return nc


async def settle(nc: NatsClient, timeout_s: float = 5.0) -> None:
    """Return once the server has processed every command sent on ``nc`` so far.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of subscriptions and
    messages still queued for its flusher task, so one PONG does not prove they arrived: a
    subscription made just before may miss a message another connection publishes next. The
    first round trip lets the flusher write the queue; the second PING leaves behind it.
    """
    await nc.flush(timeout=timeout_s)
    await nc.flush(timeout=timeout_s)


async def _retry(what: str, deadline_s: float, op):
    """Run ``op()`` until it succeeds, retrying while JetStream is not ready, until the deadline."""
    end = time.monotonic() + deadline_s
    delay = 0.05
    while True:
        try:
            return await op()
        except _NOT_READY as e:
            if time.monotonic() + delay > end:
                raise UpstreamTimeout(f"{what}: JetStream not ready after {deadline_s:.1f}s ({e!r})") from e
        except APIError as e:
            # 10008 "JetStream system temporarily unavailable" and 503s arrive as plain APIError.
            if e.code not in (503,) and e.err_code not in (10008,):
                raise
            if time.monotonic() + delay > end:
                raise UpstreamTimeout(f"{what}: JetStream not ready after {deadline_s:.1f}s ({e!r})") from e
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def ensure_stream(js_manager, config: api.StreamConfig, *, deadline_s: float = 15.0) -> api.StreamInfo:
    """Create the stream, or update it to ``config`` if it exists; retries while not ready."""

    async def _op():
        try:
            await js_manager.stream_info(config.name)
        except NotFoundError:
            try:
                return await js_manager.add_stream(config=config)
            except BadRequestError as e:
                if e.err_code != 10058:  # stream name already in use (created concurrently)
                    raise
        return await js_manager.update_stream(config=config)

    return await _retry(f"ensure stream {config.name}", deadline_s, _op)


async def ensure_consumer(
    js_manager, stream: str, config: api.ConsumerConfig, *, deadline_s: float = 15.0
) -> api.ConsumerInfo:
    """Create a durable consumer if absent (existing consumers are kept as they are)."""

    async def _op():
        try:
            return await js_manager.consumer_info(stream, config.durable_name)
        except NotFoundError:
            return await js_manager.add_consumer(stream, config=config)

    return await _retry(f"ensure consumer {stream}/{config.durable_name}", deadline_s, _op)
