"""A request that finds no decode or prefill instance in the router's view waits for its heartbeats (a router just
started, or its NATS server back) instead of a 503 no instance caused; a view that stays empty still answers 503."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from libs.common import subjects
from services.router.live_view import LiveView
from tests.router.conftest import HTTP_TIMEOUT, PD, PRFAAS, heartbeat, load

BODY = {"model": "reference", "prompt": "hello", "max_tokens": 2}


async def test_until_serving_returns_at_the_heartbeats_or_the_timeout():
    """until_serving returns once a decode and a prefill instance are heard, and gives up after its timeout."""
    view = LiveView(PD, instance_ttl_s=5.0, pending_ttl_s=5.0, default_hardware="h20")
    started = time.monotonic()
    await view.until_serving(0.2)
    assert 0.2 <= time.monotonic() - started < 2.0 and not view.serving()  # upper: a loaded machine's loop
    waiting = asyncio.ensure_future(view.until_serving(30.0))
    view.ingest_load(load("d0"))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # a decode instance alone serves nothing
    view.ingest_load(load("p-remote", role="prefill", site=PRFAAS))
    await asyncio.wait_for(waiting, 5.0)
    assert view.serving()


async def test_a_request_before_the_first_heartbeats_is_decided_once_they_come(start_router, nc, kv_index):
    """Sent to a router that has heard no instance yet, the request is decided after the heartbeats, not refused."""
    svc = await start_router(models=("reference",), reserve_timeout_s=3.0)
    decided = asyncio.Event()

    async def on_decision(msg) -> None:
        decided.set()

    sub = await nc.subscribe(subjects.decisions(PD), cb=on_decision)
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        request = asyncio.ensure_future(http.post(svc.url + "/v1/completions", json=BODY))
        await asyncio.sleep(0.3)
        assert not request.done()
        await heartbeat(nc, load("d0"), load("p-remote", role="prefill", site=PRFAAS))
        # No gateway answers behind these heartbeats: the decision is what shows the request waited for them.
        await asyncio.wait_for(decided.wait(), 10)
        request.cancel()
    await sub.unsubscribe()
