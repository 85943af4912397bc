"""The one shape of a service's ``main()``: config from env, logging and tracing, serve until a signal."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from libs.common.errors import PrfaasError
from libs.common.service import end_leftovers
from libs.common.telemetry import setup_logging, setup_tracing


class _ServiceConfig(Protocol):
    log_level: str
    stop_timeout_s: float


C = TypeVar("C", bound=_ServiceConfig)


def run_service(name: str, load_config: Callable[[], C], serve: Callable[[C, asyncio.Event], Awaitable[None]]) -> None:
    """Run ``serve(config, stop)`` until SIGINT/SIGTERM sets ``stop``.

    A bad setting or a dependency unreachable at start is one line on stderr (``<name>: <code>:
    <message>``) and exit code 2, never a traceback.
    """
    try:
        config = load_config()
        setup_logging(config.log_level)
        setup_tracing(name)
        asyncio.run(_until_signalled(serve, config))
    except (PrfaasError, OSError) as e:
        sys.stderr.write(f"{name}: {e}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


async def _until_signalled(serve: Callable[[C, asyncio.Event], Awaitable[None]], config: C) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await serve_to_the_end(serve, config, stop)


async def serve_to_the_end(
    serve: Callable[[C, asyncio.Event], Awaitable[None]], config: C, stop: asyncio.Event
) -> None:
    """``serve(config, stop)``, then every task it started ended (the NATS client's too), within the stop timeout."""
    before = asyncio.all_tasks()
    try:
        await serve(config, stop)
    finally:
        await end_leftovers(before, config.stop_timeout_s)
