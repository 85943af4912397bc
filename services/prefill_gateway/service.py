"""The prefill gateway: prefill jobs of one cluster's instances, KV streamed layer by layer to decode slots."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Mapping

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.entrypoint import run_service
from libs.common.messages import encode
from libs.common.telemetry import start_metrics_server
from libs.engine.backends import Backend
from libs.engine.build import build_backend
from libs.kvwire import JetStreamTransport, KvLinks, KvSender, LinkConfig, SenderConfig, TcpConfig, TcpTransport
from services.prefill_gateway.config import PrefillGatewayConfig
from services.prefill_gateway.handlers import handle_cancel, handle_job
from services.prefill_gateway.instance import PrefillInstance
from services.prefill_gateway.job import SHUTDOWN, PrefillRun
from services.prefill_gateway.metrics import PrefillGatewayMetrics

log = logging.getLogger(__name__)


class PrefillGatewayService:
    """The prefill instances of one process: job intake, queues, transfers paced per site pair, heartbeats."""

    def __init__(
        self,
        nc: NatsClient,
        backends: Mapping[str, Backend],
        config: PrefillGatewayConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.nc = nc
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = PrefillGatewayMetrics(self.registry)
        self.instances = {
            name: PrefillInstance(nc, config.site, config.cluster, name, backend, config.backend)
            for name, backend in backends.items()
        }
        self.links = KvLinks(
            config.site,
            LinkConfig(
                budgets_gbps=config.budgets_gbps,
                default_budget_gbps=config.default_budget_gbps,
                publish_interval_s=config.link_stats_s,
            ),
            nc=nc,
        )
        sender_config = SenderConfig(max_attempts=config.send_attempts)
        self.senders = {
            "tcp": KvSender(TcpTransport(TcpConfig(connections=config.tcp_connections)), self.links, sender_config),
            "jetstream": KvSender(JetStreamTransport(nc), self.links, sender_config),
        }
        self.small_tcp = KvSender(TcpTransport(TcpConfig(connections=1)), self.links, sender_config)
        self.runs: dict[str, PrefillRun] = {}  # by request id
        self.draining = False
        self._subs = []
        self._tasks: set[asyncio.Task] = set()
        self._jobs: set[asyncio.Task] = set()
        self._started = False

    async def __aenter__(self) -> PrefillGatewayService:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Time each instance's backend, announce its cache, subscribe to the cluster's and instances' jobs, start heartbeats."""
        if self._started:
            return
        self._started = True
        cfg = self.config
        await self.links.start()
        for instance in self.instances.values():
            await instance.calibrate()
            await instance.events.start()
        subscribe = self.nc.subscribe
        self._subs.append(await subscribe(subjects.prefill_jobs(cfg.site, cfg.cluster),
                                          queue=subjects.prefill_queue_group(cfg.cluster), cb=self._on_cluster_job))
        for name in self.instances:
            self._subs.append(await subscribe(subjects.prefill_instance_jobs(cfg.site, cfg.cluster, name),
                                              cb=self._instance_handler(name)))
        self._subs.append(await subscribe(subjects.JOB_CANCEL, cb=self._on_cancel))
        self._spawn(self._heartbeat())
        await settle(self.nc)
        log.info("prefill gateway started", extra={"site": cfg.site, "cluster": cfg.cluster,
                                                   "instances": ",".join(self.instances), "backend": cfg.backend.backend})

    async def stop(self) -> None:
        """Stop intake, let jobs in flight finish within ``drain_timeout_s``, hand back the rest (idempotent)."""
        if not self._started:
            return
        self._started = False
        self.draining = True
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        self._subs.clear()
        if self._jobs:
            log.info("draining", extra={"jobs": len(self._jobs), "timeout_s": self.config.drain_timeout_s})
            await asyncio.wait(self._jobs, timeout=self.config.drain_timeout_s)
        for request_id in list(self.runs):
            self.cancel(request_id, SHUTDOWN)
        if self._jobs:
            await asyncio.wait(self._jobs)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for instance in self.instances.values():
            await instance.events.stop()
        await self.links.stop()
        with contextlib.suppress(nats.errors.Error):
            await self.nc.flush(timeout=self.config.connect_timeout_s)

    def _spawn(self, coro: Awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- jobs -------------------------------------------------------------------------------

    def sender(self, transport: str, payload_bytes: int) -> KvSender:
        """The sender of a transfer: direct TCP over one connection when it is small, else striped."""
        if transport == "tcp" and payload_bytes < self.config.tcp_small_bytes:
            return self.small_tcp
        return self.senders[transport]

    def started(self, run: PrefillRun, coro: Awaitable) -> None:
        """Queue an accepted job on its instance and run it as an owned task."""
        run.instance.queue.append(run.queued)
        self.runs[run.job.request_id] = run
        task = asyncio.ensure_future(coro)
        run.task = task
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        self.metrics.queue_depth.labels(run.instance.name).set(len(run.instance.queue))

    def finished(self, run: PrefillRun) -> None:
        """Take an ended job off its instance's queue."""
        if self.runs.get(run.job.request_id) is run:
            del self.runs[run.job.request_id]
        with contextlib.suppress(ValueError):
            run.instance.queue.remove(run.queued)
        self.metrics.queue_depth.labels(run.instance.name).set(len(run.instance.queue))

    def cancel(self, request_id: str, reason: str) -> bool:
        """Stop a job (compute and transfer); False if it is not held here."""
        run = self.runs.get(request_id)
        if run is None or run.task is None:
            return False
        run.cancel_reason = run.cancel_reason or reason
        run.task.cancel()
        return True

    # --- heartbeats -------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        while True:
            for instance in self.instances.values():
                try:
                    await self.nc.publish(subjects.load(self.config.site, instance.name), encode(instance.load()))
                except (nats.errors.Error, OSError) as e:
                    log.warning("heartbeat not published", extra={"instance": instance.name, "error": repr(e)})
            await asyncio.sleep(self.config.heartbeat_s)

    # --- subscriptions ----------------------------------------------------------------------

    async def _on_cluster_job(self, msg: Msg) -> None:
        await handle_job(self, msg)

    def _instance_handler(self, name: str):
        async def _on_instance_job(msg: Msg) -> None:
            await handle_job(self, msg, name)

        return _on_instance_job

    async def _on_cancel(self, msg: Msg) -> None:
        await handle_cancel(self, msg)


async def run(config: PrefillGatewayConfig, stop: asyncio.Event) -> None:
    """Connect, serve until ``stop`` is set, then drain."""
    backends = {name: build_backend(config.backend) for name in config.instances}
    nc = await connect(config.nats_url, name=f"prefill_gateway.{config.cluster}", connect_timeout_s=config.connect_timeout_s)
    try:
        service = PrefillGatewayService(nc, backends, config)
        if config.metrics_port:
            start_metrics_server(config.metrics_port, registry=service.registry)
        async with service:
            await stop.wait()
    finally:
        for backend in backends.values():
            await backend.close()
        with contextlib.suppress(nats.errors.Error):
            await nc.drain()


def main() -> None:
    """Entry point: ``python -m services.prefill_gateway``; a bad setting or NATS unreachable is one line, exit 2."""
    run_service("prefill_gateway", PrefillGatewayConfig.from_env, run)
