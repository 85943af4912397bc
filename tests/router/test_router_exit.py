"""A service's ``run``, served as ``main()`` serves it, ends every task started while it ran, a task that swallows a cancellation included (the NATS
client's redial loop does, its server gone), so ``asyncio.run`` does not wait on one forever at exit."""

from __future__ import annotations

import asyncio

from libs.common.entrypoint import serve_to_the_end
from services.router.service import run
from tests.router.conftest import router_config, until


async def _redials(swallowed: list[int]) -> None:
    """Loops like a redial that lost one cancellation (asyncio.wait_for of Python 3.11 around a refused connect)."""
    while True:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            swallowed.append(1)
            if len(swallowed) > 1:
                raise


async def test_run_ends_a_task_that_swallowed_its_cancellation(nats_url):
    """Stopped, run returns with the stubborn task ended (cancelled again), within its stop timeout."""
    stop = asyncio.Event()
    before = len(asyncio.all_tasks())
    runner = asyncio.ensure_future(serve_to_the_end(run, router_config(nats_url, stop_timeout_s=5.0), stop))
    await until(lambda: len(asyncio.all_tasks()) > before + 3, timeout_s=20, what="router started")  # NATS, HTTP
    swallowed: list[int] = []
    stubborn = asyncio.ensure_future(_redials(swallowed))
    stop.set()
    await asyncio.wait_for(runner, 30)
    assert stubborn.done() and stubborn.cancelled() and swallowed == [1, 1]
