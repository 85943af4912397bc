"""The decode gateway: reserves a slot and receiver memory per job, receives KV, decodes, streams tokens."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from libs.common import subjects
from libs.common.bus import connect
from libs.common.entrypoint import run_service
from libs.common.jobs import JobTable
from libs.common.messages import InstanceLoad
from libs.common.pki import server_context
from libs.common.service import BusService, heartbeat, serve
from libs.engine.backends import Backend
from libs.engine.build import build_backend
from libs.engine.events import KvEventPublisher
from libs.kvwire import JetStreamReceiver, KvReceiver, ReceiverConfig, TcpReceiverServer, TcpServerConfig
from services.decode_gateway.config import DecodeGatewayConfig
from services.decode_gateway.handlers import handle_cancel, handle_job, handle_resend
from services.decode_gateway.job import JobContext
from services.decode_gateway.metrics import DecodeGatewayMetrics
from services.decode_gateway.reservations import Reservation, ReservationBook
from services.decode_gateway.token_log import TokenLog

log = logging.getLogger(__name__)


class DecodeGatewayService(BusService):
    """One decode instance on the bus: reservations, KV receivers (TCP and JetStream), batched decode."""

    def __init__(
        self,
        nc: NatsClient,
        backend: Backend,
        config: DecodeGatewayConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(nc, stop_timeout_s=config.connect_timeout_s)
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
            admit=lambda manifest, bytes_needed: self.book.admit(manifest, bytes_needed),
        )
        tcp = TcpServerConfig(
            host=config.tcp_host,
            port=config.tcp_port,
            io_timeout_s=config.kv_io_timeout_s,
            header_timeout_s=config.kv_header_timeout_s,
            max_connections=config.kv_max_connections,
            tls=server_context(config.kv_tls) if config.kv_tls is not None else None,
        )
        self.tcp = TcpReceiverServer(self.receiver, tcp, self.registry)
        self.jetstream = (
            JetStreamReceiver(nc, self.receiver, config.site, config.instance, bad_messages=self.metrics.bad_messages)
            if "jetstream" in config.transports
            else None
        )
        self.events = KvEventPublisher(nc, config.site, config.instance, backend.cache, self.metrics.bad_messages)
        self.book = ReservationBook(backend, self.receiver, backend.load().max_batch, config, self.metrics)
        self.jobs: JobTable[Reservation] = JobTable()
        self.job_context = JobContext(
            nc,
            config.site,
            config.instance,
            self.receiver,
            backend,
            self.book,
            self.events,
            self.metrics,
            TokenLog(config.resend_keep_s),
        )
        self.tcp_port = 0

    async def setup(self) -> None:
        """Start the receivers, announce the cache, subscribe to jobs and cancellations, start heartbeats and leases."""
        await self.receiver.start()
        await self.tcp.start()
        self.tcp_port = self.tcp.address[1]
        if self.jetstream is not None:
            await self.jetstream.start()
        await self.events.start()
        cfg = self.config
        await self.subscribe(subjects.decode_jobs(cfg.site, cfg.instance), functools.partial(handle_job, self))
        await self.subscribe(subjects.decode_resend(cfg.site, cfg.instance), functools.partial(handle_resend, self))
        await self.subscribe(subjects.JOB_CANCEL, functools.partial(handle_cancel, self))
        self.spawn(heartbeat(self.nc, subjects.load(cfg.site, cfg.instance), self.load, cfg.heartbeat_s))
        self.spawn(self._watch_leases())
        log.info(
            "decode gateway started",
            extra={
                "site": cfg.site,
                "instance": cfg.instance,
                "backend": self.backend.name,
                "tcp_port": self.tcp_port,
                "max_batch": self.book.max_batch,
            },
        )

    async def drain(self) -> None:
        """Requests in flight get ``drain_timeout_s`` to finish; the rest end with ``no_capacity``."""
        await self.jobs.drain(self.config.drain_timeout_s)

    async def close(self) -> None:
        """Stop the receivers and the KV event publisher."""
        if self.jetstream is not None:
            await self.jetstream.stop()
        await self.tcp.stop()
        await self.receiver.stop()
        await self.events.stop()

    async def _watch_leases(self) -> None:
        """Expire reservations whose KV stopped coming (their transfers are aborted; their jobs learn why)."""
        while True:
            await asyncio.sleep(self.config.progress_poll_s)
            for res, reason in self.book.expire_stalled(time.monotonic()):
                log.info("lease expired", extra={"request_id": res.job.request_id, "transfer_id": res.job.transfer_id})
                self.receiver.abort(res.job.transfer_id, reason)

    def load(self) -> InstanceLoad:
        """This instance's heartbeat now."""
        cfg, backend, book = self.config, self.backend, self.book
        return InstanceLoad(
            site=cfg.site,
            instance=cfg.instance,
            role="decode",
            cluster=cfg.cluster,
            queue_depth=len(book),
            expected_wait_s=book.expected_wait_s(),
            free_decode_slots=0 if self.draining else book.free_slots(),
            ts=time.time(),
            hardware=cfg.backend.hardware_name,
            model=backend.model_name,
            max_batch=book.max_batch,
            reserved=book.receiving(),
            decode_active=backend.load().decode_active,
            tcp_host=cfg.host if "tcp" in cfg.transports else "",
            tcp_port=self.tcp_port if "tcp" in cfg.transports else 0,
            block_size=backend.block_size,
            max_prompt_tokens=backend.max_prompt_tokens,
            free_kv_bytes=book.free_kv_bytes(),
        )


async def run(config: DecodeGatewayConfig, stop: asyncio.Event) -> None:
    """Connect, serve until ``stop`` is set, then drain."""
    backend = build_backend(config.backend)
    try:
        nc = await connect(
            config.nats_url, name=f"decode_gateway.{config.instance}", connect_timeout_s=config.connect_timeout_s
        )
        service = DecodeGatewayService(nc, backend, config)
        await serve(service, stop, metrics_port=config.metrics_port, registry=service.registry)
    finally:
        await backend.close()


def main() -> None:
    """Entry point: ``python -m services.decode_gateway``; a bad setting or NATS unreachable is one line, exit 2."""
    run_service("decode_gateway", DecodeGatewayConfig.from_env, run)
