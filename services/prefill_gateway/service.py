"""The prefill gateway: prefill jobs of one cluster's instances, KV streamed layer by layer to decode slots."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine, Mapping

from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from libs.common import subjects
from libs.common.bus import connect
from libs.common.entrypoint import run_service
from libs.common.jobs import JobTable
from libs.common.service import BusService, heartbeat, serve
from libs.engine.backends import Backend
from libs.engine.build import build_backend
from libs.kvwire import KvLinks, LinkConfig
from services.prefill_gateway.config import PrefillGatewayConfig
from services.prefill_gateway.handlers import handle_cancel, handle_job
from services.prefill_gateway.instance import PrefillInstance
from services.prefill_gateway.job import JobContext, PrefillRun, dequeue
from services.prefill_gateway.metrics import PrefillGatewayMetrics
from services.prefill_gateway.senders import Senders
from services.prefill_gateway.suspension import end_held_jobs, watch_suspensions

log = logging.getLogger(__name__)


class PrefillGatewayService(BusService):
    """The prefill instances of one process: job intake, queues, transfers paced per site pair, heartbeats."""

    def __init__(
        self,
        nc: NatsClient,
        backends: Mapping[str, Backend],
        config: PrefillGatewayConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(nc, stop_timeout_s=config.connect_timeout_s)
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = PrefillGatewayMetrics(self.registry)
        self.instances = {
            name: PrefillInstance(
                nc, config.site, config.cluster, name, backend, config.backend, self.metrics.bad_messages
            )
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
            bad_messages=self.metrics.bad_messages,
        )
        self.senders = Senders(nc, self.links, config)
        self.runs: JobTable[PrefillRun] = JobTable()
        self.job_context = JobContext(nc, config, self.senders, self.metrics)

    async def setup(self) -> None:
        """Time each instance's backend, announce its cache, subscribe to the cluster's and instances' jobs, start heartbeats."""
        cfg = self.config
        await self.links.start()
        for instance in self.instances.values():
            await instance.calibrate()
            await instance.events.start()
        await self.subscribe(
            subjects.prefill_jobs(cfg.site, cfg.cluster),
            functools.partial(handle_job, self),
            queue=subjects.prefill_queue_group(cfg.cluster),
        )
        for name, instance in self.instances.items():
            await self.subscribe(
                subjects.prefill_instance_jobs(cfg.site, cfg.cluster, name),
                functools.partial(handle_job, self, named=name),
            )
            self.spawn(heartbeat(self.nc, subjects.load(cfg.site, name), instance.load, cfg.heartbeat_s))
        await self.subscribe(subjects.JOB_CANCEL, functools.partial(handle_cancel, self))
        if cfg.suspended_s > 0:
            held = functools.partial(end_held_jobs, self.runs)
            self.spawn(watch_suspensions(min(cfg.heartbeat_s, cfg.suspended_s / 4), cfg.suspended_s, held))
        log.info(
            "prefill gateway started",
            extra={
                "site": cfg.site,
                "cluster": cfg.cluster,
                "instances": ",".join(self.instances),
                "backend": cfg.backend.backend,
            },
        )

    async def drain(self) -> None:
        """Jobs in flight get ``drain_timeout_s`` to finish; the rest end with ``no_capacity``."""
        await self.runs.drain(self.config.drain_timeout_s)

    async def close(self) -> None:
        """Stop the instances' KV event publishers, the links' telemetry and the kept KV connections."""
        for instance in self.instances.values():
            await instance.events.stop()
        await self.links.stop()
        await self.senders.close()

    def queue(self, run: PrefillRun, coro: Coroutine[object, object, None]) -> None:
        """Queue an accepted job on its instance and run it as an owned task, off the queue when the task ends.

        A task cancelled before its first step (a job and its cancel read at once, as a resumed
        process does) never runs its coroutine, so the task itself takes the job off the queue.
        """
        run.instance.queue.append(run.queued)
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda _: dequeue(self.job_context, run))
        self.runs.start(run.job.request_id, run, task)
        self.metrics.queue_depth.labels(run.instance.name).set(len(run.instance.queue))


async def run(config: PrefillGatewayConfig, stop: asyncio.Event) -> None:
    """Connect, serve until ``stop`` is set, then drain."""
    backends = {name: build_backend(config.backend) for name in config.instances}
    try:
        nc = await connect(
            config.nats_url, name=f"prefill_gateway.{config.cluster}", connect_timeout_s=config.connect_timeout_s
        )
        service = PrefillGatewayService(nc, backends, config)
        await serve(service, stop, metrics_port=config.metrics_port, registry=service.registry)
    finally:
        for backend in backends.values():
            await backend.close()


def main() -> None:
    """Entry point: ``python -m services.prefill_gateway``; a bad setting or NATS unreachable is one line, exit 2."""
    run_service("prefill_gateway", PrefillGatewayConfig.from_env, run)
