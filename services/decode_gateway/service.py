"""The decode gateway: reserves a slot and receiver memory per job, receives KV, decodes, streams tokens."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.entrypoint import run_service
from libs.common.errors import BadRequest, NoCapacity, TransferFailed
from libs.common.messages import InstanceLoad, KvManifest, encode
from libs.common.telemetry import start_metrics_server
from libs.engine.backends import Backend
from libs.engine.build import build_backend
from libs.engine.events import KvEventPublisher
from libs.kvwire import JetStreamReceiver, KvReceiver, ReceiverConfig, TcpReceiverServer, TcpServerConfig
from services.decode_gateway.config import DecodeGatewayConfig
from services.decode_gateway.handlers import handle_cancel, handle_job
from services.decode_gateway.job import SHUTDOWN
from services.decode_gateway.metrics import DecodeGatewayMetrics
from services.decode_gateway.reservations import Reservation

log = logging.getLogger(__name__)


class DecodeGatewayService:
    """One decode instance on the bus: reservations, KV receivers (TCP and JetStream), batched decode."""

    def __init__(
        self,
        nc: NatsClient,
        backend: Backend,
        config: DecodeGatewayConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.nc = nc
        self.backend = backend
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = DecodeGatewayMetrics(self.registry)
        self.receiver = KvReceiver(
            ReceiverConfig(
                max_total_bytes=config.kv_memory_bytes,
                max_transfer_bytes=config.max_transfer_bytes,
                transfer_timeout_s=config.transfer_timeout_s,
            ),
            admit=self._admit_transfer,
        )
        self.tcp = TcpReceiverServer(self.receiver, TcpServerConfig(host=config.tcp_host, port=config.tcp_port))
        self.jetstream = (
            JetStreamReceiver(nc, self.receiver, config.site, config.instance) if "jetstream" in config.transports else None
        )
        self.events = KvEventPublisher(nc, config.site, config.instance, backend.cache)
        self.max_batch = backend.load().max_batch
        self.reservations: dict[str, Reservation] = {}  # by request id
        self.draining = False
        self.tcp_port = 0
        self._subs = []
        self._tasks: set[asyncio.Task] = set()
        self._jobs: set[asyncio.Task] = set()
        self._started = False

    async def __aenter__(self) -> DecodeGatewayService:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the receivers, announce the cache, subscribe to jobs and cancellations, start heartbeats."""
        if self._started:
            return
        self._started = True
        await self.receiver.start()
        await self.tcp.start()
        self.tcp_port = self.tcp.address[1]
        if self.jetstream is not None:
            await self.jetstream.start()
        await self.events.start()
        cfg = self.config
        self._subs.append(await self.nc.subscribe(subjects.decode_jobs(cfg.site, cfg.instance), cb=self._on_job))
        self._subs.append(await self.nc.subscribe(subjects.JOB_CANCEL, cb=self._on_cancel))
        self._spawn(self._heartbeat())
        self._spawn(self._watch_leases())
        await settle(self.nc)
        log.info("decode gateway started", extra={"site": cfg.site, "instance": cfg.instance, "backend": self.backend.name,
                                                  "tcp_port": self.tcp_port, "max_batch": self.max_batch})

    async def stop(self) -> None:
        """Stop intake, let requests in flight finish within ``drain_timeout_s``, hand back the rest (idempotent)."""
        if not self._started:
            return
        self._started = False
        self.draining = True
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs.clear()
        if self._jobs:
            log.info("draining", extra={"requests": len(self._jobs), "timeout_s": self.config.drain_timeout_s})
            await asyncio.wait(self._jobs, timeout=self.config.drain_timeout_s)
        for res in list(self.reservations.values()):
            self.cancel(res.job.request_id, SHUTDOWN)
        if self._jobs:
            await asyncio.wait(self._jobs)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.jetstream is not None:
            await self.jetstream.stop()
        await self.tcp.stop()
        await self.receiver.stop()
        await self.events.stop()
        with contextlib.suppress(nats.errors.Error):
            await self.nc.flush(timeout=self.config.connect_timeout_s)

    def _spawn(self, coro: Awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start_job(self, res: Reservation, coro: Awaitable) -> None:
        """Run a reserved request's lifecycle as an owned task."""
        task = asyncio.ensure_future(coro)
        res.task = task
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    # --- capacity ---------------------------------------------------------------------------

    def free_slots(self) -> int:
        """Batch slots a new request could reserve."""
        return max(0, self.max_batch - len(self.reservations))

    def free_kv_bytes(self) -> int:
        """Receiver bytes neither held by transfers nor reserved for ones not begun."""
        arena = self.receiver.arena
        return max(0, arena.capacity_bytes - arena.used_bytes - sum(r.pending_bytes() for r in self.reservations.values()))

    def hold(self, res: Reservation) -> None:
        """Count a new reservation and pin its prefix."""
        self.backend.cache.pin("attn_kv", res.held_hashes)
        self.reservations[res.job.request_id] = res
        self._gauges()

    def release(self, res: Reservation) -> None:
        """Free a finished request's slot, reserved bytes and pinned blocks."""
        if self.reservations.get(res.job.request_id) is res:
            del self.reservations[res.job.request_id]
            self.backend.cache.unpin("attn_kv", res.held_hashes)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.reservations.set(len(self.reservations))
        self.metrics.reserved_bytes.set(sum(r.pending_bytes() for r in self.reservations.values()))

    def cancel(self, request_id: str, reason: str) -> bool:
        """Stop a request wherever it is (waiting for KV, receiving, decoding); False if not held here."""
        res = self.reservations.get(request_id)
        if res is None or res.task is None:
            return False
        res.cancel_reason = res.cancel_reason or reason or "cancelled"
        res.task.cancel()
        return True

    # --- leases -----------------------------------------------------------------------------

    async def _watch_leases(self) -> None:
        """Renew leases from transfer progress; expire reservations whose KV stopped coming.

        Until the transfer begins the job's lease applies (the predicted wait for the prefill to start);
        then the sender's manifest says how long it expects to compute between two of its parts (its
        slowest layer of this prompt), and the lease covers that times ``lease_margin``.
        """
        while True:
            await asyncio.sleep(self.config.progress_poll_s)
            now = time.monotonic()
            for res in list(self.reservations.values()):
                if not res.receiving:
                    continue
                try:
                    assembly = self.receiver.assembly(res.job.transfer_id)
                except TransferFailed:  # not begun yet, or over (its waiter learns why)
                    pass
                else:
                    first_seen = res.begun_at is None
                    res.observe(assembly.received_bytes, now)
                    if first_seen:
                        res.gap_lease_s = self.config.lease_margin * assembly.manifest.kv_gap_s
                        self._gauges()
                if res.lease_expired(now):
                    self.metrics.leases_expired.inc()
                    reason = res.expire()
                    log.info("lease expired", extra={"request_id": res.job.request_id, "transfer_id": res.job.transfer_id})
                    self.receiver.abort(res.job.transfer_id, reason)

    def _admit_transfer(self, manifest: KvManifest, bytes_needed: int) -> None:
        """Let a transfer in only into its reservation: same ids, held prefix and prompt length, within its bytes.

        Called by the receiver (possibly in a transport thread) before the transfer takes memory; a
        refusal reaches the sender as a typed error, so nobody fills the arena without a reservation.
        """
        res = self.reservations.get(manifest.request_id)
        if res is None or res.job.transfer_id != manifest.transfer_id or not res.receiving:
            raise BadRequest(f"transfer {manifest.transfer_id} has no reservation on {self.config.instance}")
        if list(manifest.skipped_block_hashes) != res.held_hashes:
            raise BadRequest(f"transfer {manifest.transfer_id} skips {len(manifest.skipped_block_hashes)} blocks; "
                             f"the reservation holds {res.held_blocks} others")  # fmt: skip
        if manifest.num_tokens != len(res.job.prompt_tokens):
            raise BadRequest(f"transfer {manifest.transfer_id} has {manifest.num_tokens} tokens, "
                             f"the job {len(res.job.prompt_tokens)}")  # fmt: skip
        if bytes_needed > res.reserved_bytes:
            raise NoCapacity(f"transfer {manifest.transfer_id} needs {bytes_needed} bytes, "
                             f"over its reservation of {res.reserved_bytes}")  # fmt: skip

    # --- heartbeats -------------------------------------------------------------------------

    def load(self) -> InstanceLoad:
        """This instance's heartbeat now."""
        cfg, backend = self.config, self.backend
        spec = cfg.backend
        return InstanceLoad(
            site=cfg.site,
            instance=cfg.instance,
            role="decode",
            cluster=cfg.cluster,
            queue_depth=len(self.reservations),
            expected_wait_s=self._expected_wait_s(),
            free_decode_slots=0 if self.draining else self.free_slots(),
            ts=time.time(),
            hardware=spec.hardware_name,
            model=backend.model_name,
            max_batch=self.max_batch,
            reserved=sum(1 for r in self.reservations.values() if r.receiving),
            decode_active=backend.load().decode_active,
            tcp_host=cfg.host if "tcp" in cfg.transports else "",
            tcp_port=self.tcp_port if "tcp" in cfg.transports else 0,
            block_size=backend.block_size,
            max_prompt_tokens=backend.max_prompt_tokens,
            free_kv_bytes=self.free_kv_bytes(),
        )

    def _expected_wait_s(self) -> float:
        """0 with a free slot; else until the request closest to its token limit would end at its pace."""
        if self.free_slots():
            return 0.0
        now, waits = time.monotonic(), []
        for res in self.reservations.values():
            if res.generated and res.complete_at is not None:
                per_token = (now - res.complete_at) / res.generated
                waits.append(max(0, res.job.max_tokens - res.generated) * per_token)
        return min(waits, default=0.0)

    async def _heartbeat(self) -> None:
        subject = subjects.load(self.config.site, self.config.instance)
        while True:
            try:
                await self.nc.publish(subject, encode(self.load()))
            except (nats.errors.Error, OSError) as e:
                log.warning("heartbeat not published", extra={"error": repr(e)})
            await asyncio.sleep(self.config.heartbeat_s)

    # --- subscriptions ----------------------------------------------------------------------

    async def _on_job(self, msg: Msg) -> None:
        await handle_job(self, msg)

    async def _on_cancel(self, msg: Msg) -> None:
        await handle_cancel(self, msg)


async def run(config: DecodeGatewayConfig, stop: asyncio.Event) -> None:
    """Connect, serve until ``stop`` is set, then drain."""
    backend = build_backend(config.backend)
    nc = await connect(config.nats_url, name=f"decode_gateway.{config.instance}", connect_timeout_s=config.connect_timeout_s)
    try:
        service = DecodeGatewayService(nc, backend, config)
        if config.metrics_port:
            start_metrics_server(config.metrics_port, registry=service.registry)
        async with service:
            await stop.wait()
    finally:
        await backend.close()
        with contextlib.suppress(nats.errors.Error):
            await nc.drain()


def main() -> None:
    """Entry point: ``python -m services.decode_gateway``; a bad setting or NATS unreachable is one line, exit 2."""
    run_service("decode_gateway", DecodeGatewayConfig.from_env, run)
