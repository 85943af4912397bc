"""Bridge an engine's ZMQ KV events (vLLM / SGLang) into our KV event stream on JetStream.

An engine numbers its batches from 0 as soon as it serves, and a new ZMQ subscription misses
the first messages, so the bridge cannot expect to see sequence 0. The rules, per engine:

- **Baseline.** The first batch after the bridge starts, after a reconnect, or after the engine
  restarted (its sequence went back) drops what the index holds for the instance and trusts from
  there: our batch starts with ``AllBlocksCleared``. With a replay socket, the engine's whole
  replay buffer is applied first, so blocks stored before the bridge connected are found too;
  without one, blocks stored before first contact stay unknown (they only cost cache hits).
- **Gap.** A missing engine sequence is asked of the replay socket. If the answer covers it the
  gap is repaired; otherwise (no replay socket, buffer moved on, malformed batch) evictions may
  have been missed, so the instance's blocks are dropped and the bridge starts again from what it
  has: a counted, logged reset, carried by ``AllBlocksCleared`` like a baseline.
- **Snapshot requests** from the index (the instance went stale) are answered with the blocks the
  bridge knows the engine holds, after ``AllBlocksCleared``.

Everything reaches the index as ``KvEventBatch`` messages of our own per-instance numbering
(``bridge_stream``), so an index replaying the stream reaches the same state. While the ZMQ
connection is up, the bridge heartbeats for the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
import zmq
import zmq.asyncio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from zmq.utils.monitor import parse_monitor_message

from libs.common import subjects
from libs.common.errors import BadRequest
from libs.common.messages import (
    AllBlocksCleared,
    BlocksEvicted,
    BlocksStored,
    InstanceLoad,
    KvEvent,
    encode,
    kv_snapshot_request_decoder,
)
from libs.common.service import cancel_and_wait
from services.kv_index.block_mapper import BlockMapper, MappedChange
from services.kv_index.bridge_stream import BridgeStream
from services.kv_index.config import ZmqEndpoint
from services.kv_index.engine_events import EngineBatch, decode_payload, split_pub_frames
from services.kv_index.metrics import KvIndexMetrics
from services.kv_index.zmq_replay import fetch_replay

log = logging.getLogger(__name__)

MAX_COALESCED = 256  # engine messages already queued that may share one batch of ours


def to_events(changes: list[MappedChange]) -> list[KvEvent]:
    """Our KV events for the mapped changes, adjacent ones of the same op, kind and tier merged."""
    events: list[KvEvent] = []
    previous: MappedChange | None = None
    for c in changes:
        if c.op == "cleared":
            events.append(AllBlocksCleared())
        elif previous is not None and (previous.op, previous.kind, previous.tier) == (c.op, c.kind, c.tier):
            events[-1].block_hashes.extend(c.block_hashes)
        else:
            kind = BlocksStored if c.op == "stored" else BlocksEvicted
            events.append(kind(block_hashes=list(c.block_hashes), kind=c.kind, tier=c.tier))
        previous = c
    return events


class ZmqIngest:
    """Subscribe to one engine's event publisher and republish its events in our block space."""

    def __init__(
        self,
        nc: NatsClient,
        endpoint: ZmqEndpoint,
        *,
        stream: str,
        block_size: int,
        heartbeat_s: float,
        publish_timeout_s: float,
        replay_timeout_s: float,
        retry_backoff_max_s: float,
        metrics: KvIndexMetrics,
        context: zmq.asyncio.Context,
        applied_seq: Callable[[], Awaitable[int]],
    ) -> None:
        self.nc = nc
        self.endpoint = endpoint
        self.out = BridgeStream(
            nc.jetstream(timeout=publish_timeout_s),
            stream,
            endpoint.site,
            endpoint.instance,
            timeout_s=publish_timeout_s,
            retry_backoff_max_s=retry_backoff_max_s,
            applied_seq=applied_seq,
        )
        self.mapper = BlockMapper(block_size)
        self.heartbeat_s = heartbeat_s
        self.replay_timeout_s = replay_timeout_s
        self.metrics = metrics
        self.context = context
        self.connected = asyncio.Event()
        self._label = f"{endpoint.site}/{endpoint.instance}"
        self._next: int | None = None  # next engine sequence expected; None until (re)contact
        self._live_last: int | None = None  # last sequence seen on the PUB socket
        self._contact = "first contact"
        self._lock = asyncio.Lock()  # one batch of ours at a time, in order; the mapper is only used under it
        self._pending: list[MappedChange] = []  # changes not yet published (flushed before the lock is released)

    async def run(self) -> None:
        """Receive, translate and publish until cancelled."""
        await self.out.resume()
        async with self._lock:
            self._drop_all("bridge started")
            await self._flush()
        snapshot_sub = await self.nc.subscribe(
            subjects.kv_snapshot_request(self.endpoint.site, self.endpoint.instance), cb=self._on_snapshot_request
        )
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint.url)
        tasks = [asyncio.create_task(coro) for coro in (self._receive(sock), self._watch(monitor), self._heartbeats())]
        try:
            await asyncio.gather(*tasks)  # none ends but by failing: then the supervisor restarts the bridge
        finally:
            await cancel_and_wait(tasks)
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            try:
                await snapshot_sub.unsubscribe()
            except nats.errors.Error:
                pass

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        """Handle engine messages in arrival order; what queued up meanwhile goes out as one batch of ours."""
        while True:
            queued = [await sock.recv_multipart()]
            async with self._lock:
                while len(queued) < MAX_COALESCED:
                    try:
                        queued.append(await sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                for frames in queued:
                    await self._on_frames(frames)
                await self._flush()

    # --- engine batches ----------------------------------------------------------------------

    async def _on_frames(self, frames: list[bytes]) -> None:
        try:
            seq, payload = split_pub_frames(frames)
        except BadRequest as e:
            self._count_bad(e)
            return
        restarted = self._live_last is not None and seq <= self._live_last
        self._live_last = seq
        if self._next is None or restarted:
            await self._resync(0, (seq, payload), baseline="engine restarted" if restarted else self._contact)
        elif seq < self._next:
            return  # already applied from a replay
        elif seq > self._next:
            await self._resync(self._next, (seq, payload))
        else:
            changes, malformed = await asyncio.to_thread(self._map_run, [(seq, payload)])
            if malformed is not None:
                self._count_reset(
                    "malformed batch", {"site": self.endpoint.site, "instance": self.endpoint.instance, "seq": seq}
                )
            self._queue(changes)
            self._next = seq + 1

    async def _resync(self, start: int, live: tuple[int, bytes] | None, baseline: str = "") -> None:
        """Catch up from engine sequence ``start`` (to the live batch, if any): replay, or restart."""
        batches, failure = await self._replayed(start)
        if live is not None:
            batches[live[0]] = live[1]
        elif not batches:
            return  # nothing to start from yet: wait for the engine's next batch
        run = _contiguous_tail(batches)
        where = {
            "site": self.endpoint.site,
            "instance": self.endpoint.instance,
            "expected_seq": start,
            "seq": max(batches),
        }
        if baseline:
            self.metrics.engine_baselines.labels(self._label, baseline).inc()
            log.info("engine baseline (%s) from %d batches", baseline, len(run), extra=where)
            self.mapper.reset()
            self._queue([MappedChange("cleared")])
        elif run[0][0] == start:
            log.info("engine sequence gap: %d batches replayed", len(run), extra=where)
        else:
            self._count_reset(
                failure or ("replay buffer moved on" if self.endpoint.replay_url else "no replay socket"), where
            )
            self.mapper.reset()
            self._queue([MappedChange("cleared")])
        changes, malformed = await asyncio.to_thread(self._map_run, run)
        if malformed is not None and not baseline:
            self._count_reset("malformed batch", {**where, "seq": malformed})
        elif not baseline and run[0][0] == start:
            self.metrics.engine_gaps_repaired.labels(self._label).inc()
        self._queue(changes)
        self._next = run[-1][0] + 1

    def _count_reset(self, reason: str, where: dict) -> None:
        self.metrics.engine_resets.labels(self._label, reason).inc()
        log.warning(
            "engine KV events lost (%s): the instance's blocks are dropped and rebuilt from the next batch",
            reason,
            extra=where,
        )

    async def _replayed(self, start: int) -> tuple[dict[int, bytes], str]:
        """The engine's buffered batches from ``start`` (undecoded), and why there are none if so."""
        url = self.endpoint.replay_url
        if url is None:
            return {}, ""
        where = {"site": self.endpoint.site, "instance": self.endpoint.instance, "replay_url": url}
        try:
            raw, whole = await fetch_replay(self.context, url, start, self.replay_timeout_s)
        except BadRequest as e:
            log.warning("engine replay answer malformed: %s", e.message, extra=where)
            return {}, "replay failed"
        if not whole:
            log.warning(
                "engine replay incomplete within %.1fs; using the %d batches received",
                self.replay_timeout_s,
                len(raw),
                extra=where,
            )
        if not raw:
            return {}, "replay failed"
        self.metrics.engine_replayed_batches.labels(self._label).inc(len(raw))
        return {seq: payload for seq, payload in raw.items() if seq >= start}, ""

    def _decoded(self, payload: bytes) -> EngineBatch | None:
        try:
            return decode_payload(payload)
        except BadRequest as e:
            self._count_bad(e)
            return None

    def _count_bad(self, e: BadRequest) -> None:
        self.metrics.bad_messages.labels("zmq").inc()
        log.warning("malformed engine KV event", extra={"endpoint": self.endpoint.url, "error": e.message})

    def _map_run(self, run: list[tuple[int, bytes]]) -> tuple[list[MappedChange], int | None]:
        """Decode and map consecutive engine batches, one at a time (CPU-bound: run in a thread, under the lock).

        A malformed batch drops everything before it (``cleared``, mapper reset); returns the changes
        and the sequence number of the last malformed batch, if any.
        """
        changes: list[MappedChange] = []
        malformed = None
        for seq, payload in run:
            batch = self._decoded(payload)
            if batch is None:
                self.mapper.reset()
                changes, malformed = [MappedChange("cleared")], seq
            else:
                changes += self._map(batch)
        return changes, malformed

    def _map(self, batch: EngineBatch) -> list[MappedChange]:
        """Our changes for one engine batch, counting what could not be mapped."""
        mapper = self.mapper
        unmapped, skipped = mapper.unmapped_blocks, dict(mapper.skipped_blocks)
        changes = mapper.apply(batch.events)
        if batch.ignored_events:
            self.metrics.engine_ignored_events.labels(self._label).inc(batch.ignored_events)
        if mapper.unmapped_blocks > unmapped:
            self.metrics.engine_unmapped.labels(self._label).inc(mapper.unmapped_blocks - unmapped)
        for reason, count in mapper.skipped_blocks.items():
            if count > skipped.get(reason, 0):
                self.metrics.engine_skipped.labels(self._label, reason).inc(count - skipped.get(reason, 0))
        return changes

    def _queue(self, changes: list[MappedChange]) -> None:
        """Queue our changes; ``_flush`` publishes them before the lock is released."""
        self._pending += changes

    async def _flush(self) -> None:
        if self._pending:
            changes, self._pending = self._pending, []
            await self.out.publish(to_events(changes))

    def _drop_all(self, why: str) -> None:
        """Tell the index to drop the instance's blocks; the next engine batch is a baseline."""
        log.info(
            "engine blocks dropped until the next baseline",
            extra={"site": self.endpoint.site, "instance": self.endpoint.instance, "reason": why},
        )
        self.mapper.reset()
        self._next = None
        self._live_last = None
        self._queue([MappedChange("cleared")])

    # --- index requests, connection, heartbeats -------------------------------------------------

    async def _on_snapshot_request(self, msg: Msg) -> None:
        """Answer the index's snapshot request with the blocks the bridge knows the engine holds."""
        try:
            kv_snapshot_request_decoder.decode(msg.data)
        except msgspec.DecodeError as e:
            self.metrics.bad_messages.labels("snapshot_request").inc()
            log.warning("malformed snapshot request", extra={"subject": msg.subject, "error": str(e)})
            return
        async with self._lock:
            held = self.mapper.held()
            log.info(
                "answering snapshot request",
                extra={
                    "site": self.endpoint.site,
                    "instance": self.endpoint.instance,
                    "blocks": sum(len(h) for h in held.values()),
                },
            )
            events: list[KvEvent] = [AllBlocksCleared()]
            events += [BlocksStored(block_hashes=hashes, kind=kind, tier=tier) for (kind, tier), hashes in held.items()]
            await self.out.publish(events)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connected.set()
                if self.endpoint.replay_url is not None:
                    async with self._lock:
                        if self._next is None:  # an idle engine's buffered batches are a baseline too
                            await self._resync(0, None, baseline=self._contact)
                            await self._flush()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected.clear()
                async with self._lock:
                    self._contact = "reconnect"
                    self._drop_all("engine disconnected")
                    await self._flush()

    async def _heartbeats(self) -> None:
        ep = self.endpoint
        while True:
            await self.connected.wait()
            load = InstanceLoad(site=ep.site, instance=ep.instance, role="prefill", ts=time.time())
            await self.nc.publish(subjects.load(ep.site, ep.instance), encode(load))
            await asyncio.sleep(self.heartbeat_s)


def _contiguous_tail(batches: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """The newest run of consecutive batches, oldest first."""
    run: list[tuple[int, bytes]] = []
    for seq in sorted(batches, reverse=True):
        if run and seq != run[-1][0] - 1:
            break
        run.append((seq, batches[seq]))
    run.reverse()
    return run
