"""The router service: OpenAI-compatible HTTP front end, live view from the bus, decisions, dispatch."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import time

from aiohttp import web
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from libs.common import subjects
from libs.common.bus import connect
from libs.common.entrypoint import run_service
from libs.common.errors import PrfaasError
from libs.common.service import BusService, serve
from services.decode_gateway.client import DecodeGatewayClient
from services.kv_index.client import KvIndexClient
from services.prefill_gateway.client import PrefillGatewayClient
from services.router.chat_template import load_chat_template
from services.router.config import RouterConfig
from services.router.connections import CappedSite
from services.router.dispatch import DispatchContext
from services.router.events import DecisionLog
from services.router.handlers import handle_link_stats, handle_load
from services.router.http import create_app
from services.router.live_view import LiveView
from services.router.mailbox import Mailbox
from services.router.metrics import RouterMetrics
from services.router.replan import Replanner
from services.router.scheduler import Scheduler
from services.router.tokenization import load_tokenizer

log = logging.getLogger(__name__)


class RouterService(BusService):
    """Serves the HTTP API on ``config.host:config.port`` and routes each request over the bus."""

    def __init__(
        self,
        nc: NatsClient,
        config: RouterConfig,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(nc, stop_timeout_s=config.stop_timeout_s)
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = RouterMetrics(self.registry, config)
        self.view = LiveView(
            config.site,
            instance_ttl_s=config.instance_ttl_s,
            pending_ttl_s=config.pending_ttl_s,
            default_hardware=config.default_hardware,
            link_capacities=dict(config.link_capacities),
            default_link_capacity_gbps=config.default_link_capacity_gbps,
            breaker=config.breaker,
        )
        self.metrics.watch_links(self.view.link_states)
        self.metrics.watch_kv_paths(self.view.kv_paths)
        tokenizer = load_tokenizer(config.tokenizer)
        template = load_chat_template(
            config.chat_template, tokenizer.chat_template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
        )
        self.index = KvIndexClient(nc, timeout_s=config.index_timeout_s)
        self.scheduler = Scheduler(config, tokenizer, template, self.view, self.index, registry=self.registry)
        self.events = DecisionLog(
            nc, config.site, max_age_s=config.decisions_max_age_s, max_bytes=config.decisions_max_bytes
        )
        self.replanner = Replanner(config, self.scheduler, self.view, self.events, self.metrics.threshold)
        self.mailbox = Mailbox(nc, self.metrics.bad_messages)
        self.dispatch = DispatchContext(
            nc,
            config,
            self.scheduler,
            self.view,
            self.events,
            self.mailbox,
            decode=DecodeGatewayClient(nc, config.reserve_timeout_s),
            prefill=PrefillGatewayClient(nc, config.accept_timeout_s),
            observe=self.replanner.observe,
        )
        self.started_at = int(time.time())
        self.port = 0  # the bound HTTP port once started
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL of the HTTP API (``http://host:port``)."""
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "") else self.config.host
        return f"http://{host}:{self.port}"

    async def setup(self) -> None:
        """Ensure the decisions stream, subscribe to heartbeats, link telemetry and the job inbox, serve HTTP."""
        await self.events.ensure_stream()
        await self.subscribe(subjects.LOAD_ALL, functools.partial(handle_load, self))
        await self.subscribe(subjects.LINK_ALL, functools.partial(handle_link_stats, self))
        await self.subscribe(self.mailbox.subject, self.mailbox.handle)
        self.metrics.threshold.set(self.scheduler.policy.config.threshold_tokens)
        if self.config.replan_interval_s > 0:
            self.spawn(self.replanner.run())
        self._runner = web.AppRunner(
            create_app(self, self.config),
            handler_cancellation=True,
            shutdown_timeout=self.config.stop_timeout_s,
            access_log=None,
        )
        await self._runner.setup()
        site = CappedSite(
            self._runner, self.config.host, self.config.port, self.config.max_connections, self.metrics.refused
        )
        await site.start()
        self.port = self._runner.addresses[0][1]
        log.info("router started", extra={"site": self.config.site, "url": self.url, "policy": self.config.policy})

    async def stop_intake(self) -> None:
        """Stop the HTTP server; requests in flight get ``stop_timeout_s`` to finish while their tokens still arrive."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def close(self) -> None:
        """Flush the decision log (outcomes still queued leave with it); stop the token cache's background check."""
        await self.events.close()
        self.scheduler.token_cache.close()

    def kv_path(self) -> dict:
        """The cross-site KV path: ``up`` unless every pair into this site is down (no pair: up), and each pair's why."""
        paths = self.view.kv_paths()
        return {
            "up": not paths or any(p.up for p in paths),
            "pairs": {f"{p.src_site}->{p.dst_site}": p.down_why or "up" for p in paths},
        }

    async def readiness(self) -> dict[str, bool]:
        """What ``/readyz`` checks: the bus, the KV index (a lookup answered in time), live decode and prefill instances.

        With ``ready_requires_kv_path``, also the cross-site KV path (``kv_path``). Without it a broken path leaves the
        router ready: every router of the site sees the same link, and taking them all out of a load balancer
        would stop the local serving that still works; the ``prfaas_router_kv_path_up`` gauge is what alerts.
        """
        index_ok = False
        if self.nc.is_connected:
            try:
                await KvIndexClient(self.nc, timeout_s=self.config.ready_timeout_s).lookup([1])
                index_ok = True
            except PrfaasError:
                index_ok = False
        alive = self.view.alive()
        decode = any(ld.role == "decode" and ld.site == self.config.site for ld in alive)
        prefill = any(ld.role == "prefill" for ld in alive)
        checks = {
            "bus": self.nc.is_connected,
            "index": index_ok,
            "decode_instances": decode,
            "prefill_instances": prefill,
        }
        if self.config.ready_requires_kv_path:
            checks["kv_path"] = self.kv_path()["up"]
        return checks


async def run(config: RouterConfig, stop: asyncio.Event) -> None:
    """Connect, serve until ``stop`` is set, then drain."""
    nc = await connect(config.nats_url, name=f"router-{config.router_id}", connect_timeout_s=config.connect_timeout_s)
    service = RouterService(nc, config)
    gc.freeze()  # what start-up made (tokenizer, template, policy) lives as long as the process: collections skip it
    await serve(service, stop, metrics_port=0, registry=service.registry)  # /metrics is on the router's own port


def main() -> None:
    """Entry point: ``python -m services.router``; a bad setting or NATS unreachable is one line, exit 2."""
    run_service("router", RouterConfig.from_env, run)
