"""The KV index service: durable ingest of KV events into Redis, lookups over NATS."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import nats.errors
import redis.asyncio as aioredis
import redis.exceptions
import zmq.asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from libs.common import subjects
from libs.common.bus import connect, ensure_consumer, ensure_stream
from libs.common.entrypoint import run_service
from libs.common.errors import BadRequest, UpstreamTimeout
from libs.common.handling import guarded, refuse
from libs.common.messages import KvSnapshotRequest, encode
from libs.common.service import BusService, serve
from services.kv_index.config import KvIndexConfig
from services.kv_index.handlers import handle_kv_batch, handle_load, handle_lookup
from services.kv_index.metrics import KvIndexMetrics
from services.kv_index.store import RedisKvStore
from services.kv_index.zmq_ingest import ZmqIngest

log = logging.getLogger(__name__)

QUEUE_GROUP = "kv-index"


class _StoreReset(Exception):
    """Redis came back without our data: rebuild it by replaying the event stream."""


class KvIndexService(BusService):
    """Consumes KV events (JetStream, durable) into Redis and answers lookups on NATS."""

    store_errors: tuple[type[BaseException], ...] = (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        OSError,
    )

    def __init__(
        self,
        nc: NatsClient,
        redis_client: aioredis.Redis,
        config: KvIndexConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(nc, stop_timeout_s=config.connect_timeout_s)
        self.js = nc.jetstream()
        self.config = config
        self.store = RedisKvStore(redis_client, config.key_prefix)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = KvIndexMetrics(self.registry)
        self._lookup_slots = asyncio.Semaphore(config.max_concurrent_lookups)
        self._snapshot_requested_at: dict[tuple[str, str], float] = {}
        self._zmq_context: zmq.asyncio.Context | None = None

    async def setup(self) -> None:
        """Ensure the event stream, subscribe, and start ingest tasks."""
        await ensure_stream(
            self.js,
            api.StreamConfig(
                name=self.config.stream,
                subjects=[subjects.KV_EVENTS_ALL],
                retention=api.RetentionPolicy.LIMITS,
                storage=api.StorageType.FILE,
                max_age=self.config.stream_max_age_s,
                duplicate_window=120.0,
            ),
        )
        await self.subscribe(subjects.KV_LOOKUP, self._on_lookup, queue=QUEUE_GROUP)
        await self.subscribe(subjects.LOAD_ALL, functools.partial(handle_load, self), queue=QUEUE_GROUP)
        self.spawn(self._supervise("ingest", self._ingest))
        self.spawn(self._supervise("forget", self._forget_silent))
        if self.config.zmq_endpoints:
            self._zmq_context = zmq.asyncio.Context()
            for endpoint in self.config.zmq_endpoints:
                ingest = ZmqIngest(
                    self.nc,
                    endpoint,
                    stream=self.config.stream,
                    block_size=self.config.block_size,
                    heartbeat_s=self.config.zmq_heartbeat_s,
                    publish_timeout_s=self.config.lookup_timeout_s * 4,
                    replay_timeout_s=self.config.zmq_replay_timeout_s,
                    retry_backoff_max_s=self.config.retry_backoff_max_s,
                    metrics=self.metrics,
                    context=self._zmq_context,
                    applied_seq=functools.partial(self._applied_seq, endpoint.site, endpoint.instance),
                )
                self.spawn(self._supervise(f"zmq {endpoint.url}", ingest.run))
        log.info(
            "kv_index started", extra={"stream": self.config.stream, "zmq_endpoints": len(self.config.zmq_endpoints)}
        )

    async def close(self) -> None:
        """Release the ZMQ context of the engine bridges."""
        if self._zmq_context is not None:
            self._zmq_context.term()
            self._zmq_context = None

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run()`` forever, restarting it with backoff after unexpected failures."""
        backoff = 0.05
        while True:
            try:
                await run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("task %s failed (%r); restarting in %.2fs", name, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.retry_backoff_max_s)

    # --- ingest -------------------------------------------------------------------------

    async def _ingest(self) -> None:
        """Consume the event stream; rebuild from its start whenever Redis lost its data."""
        replay = False
        while True:
            psub = await self._open_consumer(replay)
            try:
                await self._consume(psub)
            except _StoreReset:
                self.metrics.replays.inc()
                log.warning("redis lost the index; replaying the event stream")
                replay = True
            finally:
                try:
                    await psub.unsubscribe()
                except nats.errors.Error:
                    pass

    async def _open_consumer(self, replay: bool):
        """Bind to the durable consumer; recreate it from the stream's start if the store is new."""
        fresh = await self._until_store(self.store.ensure_generation)
        if fresh or replay:
            try:
                await self.js.delete_consumer(self.config.stream, self.config.durable)
            except NotFoundError:
                pass
        await ensure_consumer(
            self.js,
            self.config.stream,
            api.ConsumerConfig(
                durable_name=self.config.durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                ack_wait=30.0,
                max_ack_pending=self.config.fetch_batch * 4,
            ),
        )
        return await self.js.pull_subscribe_bind(durable=self.config.durable, stream=self.config.stream)

    async def _until_store(self, op: Callable[[], Awaitable]):
        """Run a store operation, waiting with backoff while Redis is unreachable."""
        backoff = 0.05
        while True:
            try:
                return await op()
            except self.store_errors:
                self.metrics.store_errors.labels("ingest").inc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.retry_backoff_max_s)

    async def _consume(self, psub) -> None:
        while True:
            try:
                msgs = await psub.fetch(self.config.fetch_batch, timeout=self.config.fetch_timeout_s)
            except (nats.errors.TimeoutError, TimeoutError):
                msgs = []
            # Once per fetch (also when idle): did Redis restart without our data?
            if await self._until_store(self.store.ensure_generation):
                raise _StoreReset
            for msg in msgs:
                await self._apply(msg)

    async def _apply(self, msg: Msg) -> None:
        """Apply one stream message, retrying while Redis is down; ack only once applied."""
        backoff = 0.05
        while True:
            try:
                await handle_kv_batch(self, msg.data)
                await msg.ack()
                return
            except (BadRequest, redis.exceptions.ResponseError) as e:  # a batch the store refuses is no outage
                refuse(msg.subject, "event", str(e), self.metrics.bad_messages)
                await msg.term()  # never redelivered: a poison batch must not stall the stream
                return
            except self.store_errors as e:
                self.metrics.store_errors.labels("apply").inc()
                log.debug("store unavailable; retrying", extra={"error": repr(e)})
            await msg.in_progress()
            # Before retrying, make sure Redis still holds the index (it may have restarted empty).
            if await self._until_store(self.store.ensure_generation):
                raise _StoreReset
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.retry_backoff_max_s)

    async def _forget_silent(self) -> None:
        """Periodically drop the blocks of instances silent for ``forget_after_s``."""
        while True:
            await asyncio.sleep(min(60.0, self.config.forget_after_s / 4))
            try:
                forgotten = await self.store.forget_silent(time.time() - self.config.forget_after_s)
            except self.store_errors:
                continue
            if forgotten:
                log.info("forgot silent instances", extra={"slots": forgotten})

    async def _applied_seq(self, site: str, instance: str) -> int:
        """The sequence number of the instance's last batch in the store, waiting while Redis is down."""
        slot = await self._until_store(lambda: self.store.slot_for(site, instance))
        return await self._until_store(lambda: self.store.last_seq(slot))

    async def request_snapshot(self, req: KvSnapshotRequest) -> None:
        """Ask an instance for a snapshot, at most once per ``snapshot_request_interval_s``."""
        key = (req.site, req.instance)
        now = time.monotonic()
        if now - self._snapshot_requested_at.get(key, -1e9) < self.config.snapshot_request_interval_s:
            return
        self._snapshot_requested_at[key] = now
        await self.nc.publish(subjects.kv_snapshot_request(req.site, req.instance), encode(req))

    # --- subscriptions --------------------------------------------------------------------

    async def _on_lookup(self, msg: Msg) -> None:
        self.spawn(guarded(self._lookup)(msg))  # off the subscription, still answered if it fails

    async def _lookup(self, msg: Msg) -> None:
        async with self._lookup_slots:
            await handle_lookup(self, msg)


async def _wait_for_redis(client: aioredis.Redis, config: KvIndexConfig) -> None:
    """Return once Redis answers a PING; ``UpstreamTimeout`` if it does not within ``connect_timeout_s``."""
    end = time.monotonic() + config.connect_timeout_s
    while True:
        try:
            await client.ping()
            return
        except KvIndexService.store_errors as e:
            if time.monotonic() >= end:
                raise UpstreamTimeout(
                    f"cannot reach Redis at {config.redis_url} within {config.connect_timeout_s}s: {e}"
                ) from None
        await asyncio.sleep(0.1)


def open_redis(config: KvIndexConfig) -> aioredis.Redis:
    """The index's Redis client: every call bounded by ``redis_timeout_s``, no retries of its own."""
    return aioredis.Redis.from_url(
        config.redis_url,
        socket_timeout=config.redis_timeout_s,
        socket_connect_timeout=config.redis_timeout_s,
        retry=None,
    )


async def start_in_process(
    config: KvIndexConfig, client_name: str
) -> tuple[KvIndexService, Callable[[], Awaitable[None]]]:
    """Connect and start an index in this process (tests, benchmarks); returns it and an async closer."""
    nc = await connect(config.nats_url, name=client_name)
    r = open_redis(config)
    service = KvIndexService(nc, r, config)
    await service.start()

    async def close() -> None:
        await service.stop()
        await nc.drain()
        await r.aclose()

    return service, close


async def run(config: KvIndexConfig, stop: asyncio.Event) -> None:
    """Connect (Redis, then NATS), serve until ``stop`` is set, then drain."""
    redis_client = open_redis(config)
    try:
        await _wait_for_redis(redis_client, config)
        nc = await connect(config.nats_url, name="kv_index", connect_timeout_s=config.connect_timeout_s)
        service = KvIndexService(nc, redis_client, config)
        await serve(service, stop, metrics_port=config.metrics_port, registry=service.registry)
    finally:
        await redis_client.aclose()


def main() -> None:
    """Entry point: ``python -m services.kv_index``; bad config or an unreachable dependency is one line on stderr."""
    run_service("kv_index", KvIndexConfig.from_env, run)
