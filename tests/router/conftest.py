"""A router running in-process against real NATS, Redis and KV index fixtures; heartbeats as gateways send them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.messages import ErrorReply, InstanceLoad, encode
from services.router.config import RouterConfig
from services.router.service import RouterService
from tests.kv_index.conftest import index_config, start_index
from tests.router.deployment import PD, PRFAAS, Fleet

HTTP_TIMEOUT = aiohttp.ClientTimeout(total=30)  # no test request waits longer for the router


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The JSON events of a streamed answer, up to ``data: [DONE]``."""
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def router_config(nats_url: str, **overrides) -> RouterConfig:
    """A config on a free port with short deadlines suited to tests."""
    base = dict(
        nats_url=nats_url,
        site=PD,
        router_id="test-router",
        threshold_tokens=8192,
        host="127.0.0.1",
        port=0,
        replan_interval_s=0.0,
        instance_ttl_s=5.0,
        reserve_timeout_s=2.0,
        accept_timeout_s=2.0,
        index_timeout_s=0.5,
        index_min_timeout_s=0.5,
    )
    base.update(overrides)
    return RouterConfig(**base)


def load(instance: str, role: str = "decode", site: str = PD, **fields) -> InstanceLoad:
    """A heartbeat as a gateway of the reference model sends it."""
    defaults = dict(
        cluster="pd" if site == PD else "prfaas",
        model="reference",
        hardware="h20" if site == PD else "h200",
        free_decode_slots=8 if role == "decode" else 0,
        max_batch=8,
        block_size=64,
        ts=time.time(),
    )
    defaults.update(fields)
    return InstanceLoad(site=site, instance=instance, role=role, **defaults)


async def heartbeat(nc, *loads: InstanceLoad) -> None:
    """Publish heartbeats and wait until the server has them."""
    for ld in loads:
        await nc.publish(subjects.load(ld.site, ld.instance), encode(ld))
    await settle(nc)


async def until(check: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll a predicate until it holds."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{what} did not hold within {timeout_s}s")


@pytest.fixture
async def kv_index(nats_url: str, redis_url: str):
    """A KV index service answering lookups."""
    service, close = await start_index(index_config(nats_url, redis_url))
    try:
        yield service
    finally:
        await close()


@pytest.fixture
async def nc(nats_url: str):
    """A client connection for the test itself (heartbeats, events)."""
    client = await connect(nats_url, name="router-test")
    try:
        yield client
    finally:
        await client.drain()


StartRouter = Callable[..., Awaitable[RouterService]]


@contextlib.asynccontextmanager
async def router_starter(nats_url: str) -> AsyncIterator[StartRouter]:
    """Start routers on ``nats_url`` with config overrides; all are stopped on exit."""
    started: list[tuple[RouterService, object]] = []

    async def _start(**overrides) -> RouterService:
        config = router_config(nats_url, **overrides)
        client = await connect(nats_url, name="router")
        service = RouterService(client, config)
        await service.start()
        started.append((service, client))
        return service

    try:
        yield _start
    finally:
        for service, client in reversed(started):
            await service.stop()
            await client.drain()


@pytest.fixture
async def start_router(nats_url: str) -> AsyncIterator[StartRouter]:
    """Start routers on the test's NATS server."""
    async with router_starter(nats_url) as start:
        yield start


async def ready_router(start_router: StartRouter, nc, *loads: InstanceLoad, **overrides) -> RouterService:
    """A router that has received ``loads``."""
    svc = await start_router(**overrides)
    await heartbeat(nc, *loads)
    await until(lambda: all(svc.view.load_of(ld.instance) is not None for ld in loads), what="heartbeats received")
    return svc


async def reachable(svc, cluster, instances) -> None:
    """Wait until the router sees ``instances`` and a status published at the PrfaaS site reaches its inbox."""
    await until(lambda: set(instances) <= {ld.instance for ld in svc.view.alive()}, timeout_s=15, what="heartbeats")
    nc = await connect(cluster.url(PRFAAS), name="probe")
    queue = svc.mailbox.open("probe")
    try:
        async with asyncio.timeout(15):
            while queue.empty():
                await nc.publish(svc.mailbox.status_subject("probe"), encode(ErrorReply(code="probe", message="")))
                await nc.flush()
                await asyncio.sleep(0.1)
    finally:
        svc.mailbox.close("probe")
        await nc.close()


@pytest.fixture
def fleet(supercluster, tmp_path):
    """Gateways owned by one test (it may kill some)."""
    owned = Fleet(supercluster, tmp_path)
    try:
        yield owned
    finally:
        owned.stop_all()


@pytest.fixture
async def routed(supercluster, redis_url):
    """Start a router at dc-pd over a fleet (KV index in this process); returns (router, decision events)."""
    _, close = await start_index(index_config(supercluster.url(PD), redis_url))
    got: list = []
    try:
        async with router_starter(supercluster.url(PD)) as start:

            async def make(instances, **overrides):
                settings = (
                    dict(
                        policy="static-threshold",
                        threshold_tokens=0,
                        instance_ttl_s=2.0,
                        first_token_timeout_s=10.0,
                        token_timeout_s=2.0,
                    )
                    | overrides
                )
                svc = await start(**settings)
                await reachable(svc, supercluster, instances)
                original = svc.events.decision

                async def keep(event):
                    got.append(event)
                    await original(event)

                svc.events.decision = keep
                return svc, got

            yield make
    finally:
        await close()
