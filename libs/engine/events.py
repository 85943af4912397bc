"""An instance's prefix-cache events on the bus: numbered ``KvEventBatch``es and snapshots on request.

Batches are numbered from the publisher's start time in microseconds, then one by one, so a
restarted instance continues above its previous sequence; its first batch is a snapshot, which
resets what the index knew of it. A batch lost on the way is a gap the index repairs by asking
for a snapshot, which this publisher answers: at most one every ``SNAPSHOT_EVERY_S`` (a request
sooner is answered then, once for all that came meanwhile), and a request that is not a
``KvSnapshotRequest`` for this instance is counted and dropped, so a flood costs no more snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from prometheus_client import Counter

from libs.common import subjects
from libs.common.errors import BadRequest
from libs.common.handling import decoded_or_none, own_bad_messages
from libs.common.messages import (
    MAX_BATCH_EVENTS,
    MAX_BATCH_HASHES,
    BlocksEvicted,
    BlocksStored,
    KvEvent,
    KvEventBatch,
    KvSnapshot,
    KvSnapshotRequest,
    batch_size,
    encode,
    kv_snapshot_request_decoder,
)
from libs.engine.cache import PrefixCache

log = logging.getLogger(__name__)

SNAPSHOT_EVERY_S = 1.0  # requested snapshots at most this often (the index asks an instance at most every 5 s)


class KvEventPublisher:
    """Publishes what one instance's cache stores and evicts, and a snapshot when the index asks."""

    def __init__(
        self, nc: NatsClient, site: str, instance: str, cache: PrefixCache, bad_messages: Counter | None = None
    ) -> None:
        self.nc = nc
        self.site = subjects.token(site, "site")
        self.instance = subjects.token(instance, "instance")
        self.cache = cache
        self.subject = subjects.kv_events(site, instance)
        self.seq = time.time_ns() // 1000 - 1  # last number used
        self.published_batches = 0
        # counted under {subject="snapshot_request"}: the gateway's counter once it passes it, else the publisher's own
        self.bad_messages = bad_messages or own_bad_messages("prfaas_kv_events_bad_messages", "subject")
        self._sub: Subscription | None = None
        self._snapshot_at = -math.inf  # monotonic time of the last snapshot published
        self._deferred: asyncio.Task[None] | None = None  # the snapshot that answers requests that came too soon

    async def start(self) -> None:
        """Announce the cache as it is (a snapshot) and answer snapshot requests."""
        if self._sub is None:
            self._sub = await self.nc.subscribe(
                subjects.kv_snapshot_request(self.site, self.instance), cb=self._on_request
            )
            await self.publish_snapshot()

    async def stop(self) -> None:
        """Stop answering snapshot requests (idempotent)."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await deferred

    async def flush(self) -> None:
        """Publish the cache's events since the last call (nothing if there are none)."""
        for events in within_limits(self.cache.drain_events()):
            await self._publish(events)

    async def publish_snapshot(self) -> None:
        """Publish everything the cache holds (replaces the index's view of this instance)."""
        self.cache.drain_events()  # the snapshot already reflects them
        self._snapshot_at = time.monotonic()
        for events in within_limits([self.cache.snapshot()]):
            await self._publish(events)

    def _for_me(self, req: KvSnapshotRequest) -> None:
        if (req.site, req.instance) != (self.site, self.instance):
            raise BadRequest(f"a snapshot request for {req.site[:80]}/{req.instance[:80]}")

    async def _on_request(self, msg: Msg) -> None:
        req = decoded_or_none(kv_snapshot_request_decoder, msg, "snapshot_request", self.bad_messages, self._for_me)
        if req is None or (self._deferred is not None and not self._deferred.done()):
            return
        log.info("snapshot requested", extra={"site": self.site, "instance": self.instance})
        wait_s = self._snapshot_at + SNAPSHOT_EVERY_S - time.monotonic()
        if wait_s > 0:
            self._deferred = asyncio.create_task(self._snapshot_after(wait_s))
        else:
            await self.publish_snapshot()

    async def _snapshot_after(self, wait_s: float) -> None:
        await asyncio.sleep(wait_s)
        await self.publish_snapshot()

    async def _publish(self, events: list[KvEvent]) -> None:
        self.seq += 1
        batch = KvEventBatch(site=self.site, instance=self.instance, seq=self.seq, ts=time.time(), events=events)
        try:
            await self.nc.publish(self.subject, encode(batch))
            self.published_batches += 1
        except (nats.errors.Error, OSError) as e:  # a gap the index will repair with a snapshot request
            log.warning("KV events not published", extra={"instance": self.instance, "seq": self.seq, "error": repr(e)})


def _pieces(event: KvEvent) -> list[KvEvent]:
    """``event`` as events of at most ``MAX_BATCH_HASHES`` hashes each: a snapshot as an empty one (the reset) and
    its chains, a long chain as pieces each continuing from the last."""
    if isinstance(event, KvSnapshot):
        return [KvSnapshot(stored=[]), *(piece for chain in event.stored for piece in _pieces(chain))]
    if not isinstance(event, BlocksStored | BlocksEvicted):
        return [event]
    hashes, step = event.block_hashes, MAX_BATCH_HASHES
    if isinstance(event, BlocksEvicted):
        return [
            msgspec.structs.replace(event, block_hashes=hashes[i : i + step])
            for i in range(0, max(len(hashes), 1), step)
        ]
    return [
        msgspec.structs.replace(
            event, block_hashes=hashes[i : i + step], parent_hash=hashes[i - 1] if i else event.parent_hash
        )
        for i in range(0, max(len(hashes), 1), step)
    ]


def within_limits(events: list[KvEvent]) -> list[list[KvEvent]]:
    """``events`` as batches the index takes (``MAX_BATCH_EVENTS``, ``MAX_BATCH_HASHES``), in order; one if they fit."""
    count, hashes = batch_size(events)
    if count <= MAX_BATCH_EVENTS and hashes <= MAX_BATCH_HASHES:
        return [events] if events else []
    batches: list[list[KvEvent]] = [[]]
    count = hashes = 0
    for piece in (piece for event in events for piece in _pieces(event)):
        size = batch_size([piece])[1]
        if batches[-1] and (count + 1 > MAX_BATCH_EVENTS or hashes + size > MAX_BATCH_HASHES):
            batches.append([])
            count = hashes = 0
        batches[-1].append(piece)
        count, hashes = count + 1, hashes + size
    return batches
