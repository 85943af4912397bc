"""A KV index service running in-process against the real NATS and Redis fixtures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.messages import InstanceLoad, KvEvent, KvEventBatch, encode
from libs.lab.servers import free_port
from libs.lab.vllm_publisher import EnginePublisher
from services.kv_index.client import KvIndexClient
from services.kv_index.config import KvIndexConfig
from services.kv_index.service import KvIndexService, start_in_process


def index_config(nats_url: str, redis_url: str, **overrides) -> KvIndexConfig:
    """A config with short deadlines suited to tests."""
    base = dict(
        nats_url=nats_url,
        redis_url=redis_url,
        lookup_timeout_s=0.5,
        redis_timeout_s=0.3,
        fetch_timeout_s=0.2,
        retry_backoff_max_s=0.2,
    )
    base.update(overrides)
    return KvIndexConfig(**base)


async def start_index(config: KvIndexConfig) -> tuple[KvIndexService, Callable[[], Awaitable[None]]]:
    """An index service in this process; returns it and an async closer."""
    return await start_in_process(config, "kv_index-test")


class Producer:
    """Publishes KV event batches and heartbeats for one instance, numbering batches itself."""

    def __init__(self, nc, site: str, instance: str) -> None:
        self.nc, self.js, self.site, self.instance, self.seq = nc, nc.jetstream(), site, instance, 0

    async def send(self, *events: KvEvent, seq: int | None = None) -> None:
        """Publish one batch (next seq unless given) and wait for the stream's ack."""
        self.seq = self.seq + 1 if seq is None else seq
        batch = KvEventBatch(site=self.site, instance=self.instance, seq=self.seq, ts=time.time(), events=list(events))
        await self.js.publish(subjects.kv_events(self.site, self.instance), encode(batch), timeout=5)

    async def heartbeat(self) -> None:
        """Publish one load heartbeat."""
        load = InstanceLoad(site=self.site, instance=self.instance, role="prefill", ts=time.time())
        await self.nc.publish(subjects.load(self.site, self.instance), encode(load))
        await settle(self.nc)


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll an async predicate until it holds (errors count as 'not yet')."""
    end = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < end:
        try:
            if await check():
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not hold within {timeout_s}s (last error: {last!r})")


@pytest.fixture
async def index(nats_url: str, redis_url: str) -> AsyncIterator[KvIndexService]:
    """A running KV index service."""
    service, close = await start_index(index_config(nats_url, redis_url))
    try:
        yield service
    finally:
        await close()


@pytest.fixture
async def nc(nats_url: str):
    """A test client connection."""
    client = await connect(nats_url, name="test")
    try:
        yield client
    finally:
        await client.drain()


@pytest.fixture
def client(nc) -> KvIndexClient:
    """A lookup client."""
    return KvIndexClient(nc, timeout_s=2.0)


@pytest.fixture
async def engines() -> AsyncIterator[Callable[..., Awaitable[EnginePublisher]]]:
    """Starts publisher processes (``family``, ``replay``, ``buffer_steps``, ``ports``); all stopped at teardown."""
    started: list[EnginePublisher] = []

    async def start(family: str = "vllm-seven-fields", replay: bool = True, buffer_steps: int = 10_000, ports=None):
        pub, rep = ports or (free_port(), free_port() if replay else None)
        engine = await EnginePublisher.start(family, pub, rep, buffer_steps)
        started.append(engine)
        return engine

    try:
        yield start
    finally:
        for engine in started:
            await engine.stop()
