"""Bridge an engine's ZMQ KV events (vLLM / SGLang) into our KV event stream on JetStream.

Each engine batch becomes one ``KvEventBatch`` (seq = engine seq + 1) in our block space, so
the index applies engine events and our own gateways' events through one durable path. While
the ZMQ connection is up, heartbeats are published for the engine's instance.
"""

from __future__ import annotations

import asyncio
import logging
import time

import zmq
import zmq.asyncio
from nats.aio.client import Client as NatsClient
from zmq.utils.monitor import parse_monitor_message

from libs.common import subjects
from libs.common.errors import BadRequest
from libs.common.messages import (
    AllBlocksCleared,
    BlocksEvicted,
    BlocksStored,
    InstanceLoad,
    KvEvent,
    KvEventBatch,
    encode,
)
from services.kv_index.block_mapper import BlockMapper, MappedChange
from services.kv_index.config import ZmqEndpoint
from services.kv_index.engine_events import decode_frames
from services.kv_index.metrics import KvIndexMetrics

log = logging.getLogger(__name__)


def to_events(changes: list[MappedChange]) -> list[KvEvent]:
    """Our KV events for the mapped changes."""
    events: list[KvEvent] = []
    for c in changes:
        if c.op == "stored":
            events.append(BlocksStored(block_hashes=list(c.block_hashes), kind=c.kind, tier=c.tier))
        elif c.op == "evicted":
            events.append(BlocksEvicted(block_hashes=list(c.block_hashes), kind=c.kind, tier=c.tier))
        else:
            events.append(AllBlocksCleared())
    return events


class ZmqIngest:
    """Subscribe to one engine's event publisher and republish its events in our block space."""

    def __init__(
        self,
        nc: NatsClient,
        endpoint: ZmqEndpoint,
        *,
        block_size: int,
        heartbeat_s: float,
        publish_timeout_s: float,
        metrics: KvIndexMetrics,
        context: zmq.asyncio.Context,
    ) -> None:
        self.nc = nc
        self.js = nc.jetstream(timeout=publish_timeout_s)
        self.endpoint = endpoint
        self.mapper = BlockMapper(block_size)
        self.heartbeat_s = heartbeat_s
        self.metrics = metrics
        self.context = context
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Receive, translate and publish until cancelled."""
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint.url)
        watch = asyncio.create_task(self._watch(monitor))
        beat = asyncio.create_task(self._heartbeats())
        try:
            while True:
                frames = await sock.recv_multipart()
                await self._forward(frames)
        finally:
            for task in (watch, beat):
                task.cancel()
            await asyncio.gather(watch, beat, return_exceptions=True)
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)

    async def _forward(self, frames: list[bytes]) -> None:
        ep = self.endpoint
        try:
            engine_batch = decode_frames(frames)
        except BadRequest as e:
            self.metrics.bad_messages.labels("zmq").inc()
            log.warning("malformed engine KV event", extra={"endpoint": ep.url, "error": e.message})
            return
        before = self.mapper.unmapped_blocks
        events = to_events(self.mapper.apply(engine_batch.events))
        if self.mapper.unmapped_blocks > before:
            self.metrics.engine_unmapped.labels(f"{ep.site}/{ep.instance}").inc(self.mapper.unmapped_blocks - before)
        seq = engine_batch.seq + 1
        batch = KvEventBatch(site=ep.site, instance=ep.instance, seq=seq, ts=engine_batch.ts, events=events)
        await self.js.publish(
            subjects.kv_events(ep.site, ep.instance),
            encode(batch),
            headers={"Nats-Msg-Id": f"zmq/{ep.site}/{ep.instance}/{seq}"},
        )

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connected.set()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected.clear()

    async def _heartbeats(self) -> None:
        ep = self.endpoint
        while True:
            await self.connected.wait()
            load = InstanceLoad(site=ep.site, instance=ep.instance, role="prefill", ts=time.time())
            await self.nc.publish(subjects.load(ep.site, ep.instance), encode(load))
            await asyncio.sleep(self.heartbeat_s)
