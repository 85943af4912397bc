"""The lifecycle every service shares: owned tasks, subscriptions counted once settled, one shutdown order.

A service subclasses ``BusService``, subscribes and spawns in ``setup`` and releases what it owns in
``close``. ``stop`` runs the same order in every service, bounded by ``stop_timeout_s``:

1. intake stops: ``draining`` is set, ``stop_intake()`` closes what takes work from outside the bus
   (the router's HTTP server, letting its requests in flight finish while their tokens still
   arrive), then every subscription is drained (the server sends no more; messages already
   delivered are handled, so a job queued behind the stop is refused, not lost);
2. ``drain()``: the service's own work in flight finishes (gateways: their jobs, within their
   drain timeout, then the rest is handed back);
3. owned tasks are cancelled and awaited, cancelled again if one swallowed it;
4. ``close()``: receivers, publishers, HTTP servers and the like are closed;
5. the connection is flushed, so replies and events published during the stop leave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import CollectorRegistry

from libs.common.bus import settle
from libs.common.handling import guarded
from libs.common.messages import encode
from libs.common.telemetry import start_metrics_server

log = logging.getLogger(__name__)

_RECANCEL_EVERY_S = 0.5  # a cancellation can be lost in a race (Python 3.11 ``wait_for``): cancel again


class BusService:
    """Start once, stop once: subscriptions, owned tasks and the shutdown order above."""

    def __init__(self, nc: NatsClient, *, stop_timeout_s: float) -> None:
        self.nc = nc
        self.stop_timeout_s = stop_timeout_s
        self.draining = False
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task] = set()
        self._started = False

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Run ``setup`` once; started means the server holds every subscription it made."""
        if self._started:
            return
        self._started = True
        self.draining = False
        await self.setup()
        await settle(self.nc, self.stop_timeout_s)

    async def setup(self) -> None:
        """Subscribe and spawn what the service runs (called once by ``start``)."""

    async def stop_intake(self) -> None:
        """Stop taking work from outside the bus (step 1 of the shutdown order, before the subscriptions drain)."""

    async def drain(self) -> None:
        """Let the service's own work in flight finish (step 2 of the shutdown order)."""

    async def close(self) -> None:
        """Release what the service owns (step 4 of the shutdown order)."""

    async def stop(self) -> None:
        """The shutdown order of the module docstring (idempotent)."""
        if not self._started:
            return
        self._started = False
        self.draining = True
        await self.stop_intake()
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                async with asyncio.timeout(self.stop_timeout_s):
                    await sub.drain()
        self._subs.clear()
        await self.drain()
        stuck = await cancel_and_wait(self._tasks, self.stop_timeout_s)
        if stuck:
            log.warning("tasks still running after stop", extra={"tasks": stuck})
        self._tasks.clear()
        await self.close()
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await self.nc.flush(timeout=self.stop_timeout_s)

    async def subscribe(self, subject: str, handler: Callable[[Msg], Awaitable[None]], *, queue: str = "") -> None:
        """Deliver ``subject``'s messages to ``handler`` until the stop (counted once ``start`` settles); a failure
        of ``handler`` is logged and a request answered ``internal``, and the next message is still handled."""
        self._subs.append(await self.nc.subscribe(subject, queue=queue, cb=guarded(handler)))

    def spawn(self, coro: Awaitable) -> asyncio.Task:
        """Run ``coro`` as a task this service owns (cancelled and awaited at the stop)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def cancel_and_wait(tasks: Iterable[asyncio.Task], timeout_s: float | None = None) -> int:
    """Cancel the tasks and wait for them to end (cancelling again any that swallowed it); how many are left."""
    owned = list(tasks)
    pending = set(owned)
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    while pending:
        for task in pending:
            task.cancel()
        wait_s = _RECANCEL_EVERY_S if deadline is None else min(_RECANCEL_EVERY_S, deadline - loop.time())
        if wait_s <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=wait_s)
    for task in owned:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved here: a failure that raced the stop is not worth a warning at exit
    return len(pending)


async def end_leftovers(before: set[asyncio.Task], timeout_s: float) -> None:
    """Cancel what is left of the tasks started since ``before``, again while one ignores it, within ``timeout_s``.

    With its server gone a NATS client redials in a loop that can lose a cancellation (``asyncio.wait_for`` around
    its connect swallows one arriving as the connect ends, Python 3.11); ``asyncio.run`` cancels each task once at
    exit and would wait on it forever, so the process would not exit on SIGTERM.
    """
    leftovers = asyncio.all_tasks() - before - {asyncio.current_task()}
    stuck = await cancel_and_wait(leftovers, timeout_s)
    if stuck:
        log.warning("tasks still running at exit", extra={"tasks": stuck})


async def serve(service: BusService, stop: asyncio.Event, *, metrics_port: int, registry: CollectorRegistry) -> None:
    """Run ``service`` (its Prometheus endpoint on ``metrics_port`` unless 0) until ``stop`` is set, then drain its
    connection (closed within the stop timeout if the drain fails, e.g. with the server gone)."""
    if metrics_port:
        start_metrics_server(metrics_port, registry=registry)
    try:
        async with service:
            await stop.wait()
    finally:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await service.nc.drain()
        if not service.nc.is_closed:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                async with asyncio.timeout(service.stop_timeout_s):
                    await service.nc.close()


async def heartbeat(nc: NatsClient, subject: str, make: Callable[[], msgspec.Struct], every_s: float) -> None:
    """Publish ``make()`` on ``subject`` every ``every_s`` until cancelled (a failed publish is logged, not fatal)."""
    while True:
        try:
            await nc.publish(subject, encode(make()))
        except (nats.errors.Error, OSError) as e:
            log.warning("heartbeat not published", extra={"subject": subject, "error": repr(e)})
        await asyncio.sleep(every_s)
