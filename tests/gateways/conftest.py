"""Gateways as real processes on the session's two-site supercluster, and a router stand-in at the decode site.

A gateway process is ready once its first heartbeat arrives (on a connection of its own, so a
module's processes can be started by a synchronous fixture with ``asyncio.run``); tests talk to
them through ``sites`` connections made in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from libs.bench.gateways import DECODE_SITE, PREFILL_SITE, Caller, GatewayProcess, gateway_env
from libs.common import subjects
from libs.common.bus import connect
from libs.common.messages import InstanceLoad, instance_load_decoder
from libs.lab.servers import Supercluster


@dataclass
class Sites:
    """Connections at both sites of a supercluster."""

    cluster: Supercluster
    prefill_nc: NatsClient  # at the prefill (PrfaaS) site
    decode_nc: NatsClient  # at the decode (PD) site


@pytest.fixture
async def sites(supercluster: Supercluster) -> AsyncIterator[Sites]:
    """Connections at both sites of the session's supercluster."""
    prefill_nc = await connect(supercluster.url(PREFILL_SITE), name="test-prefill-site")
    decode_nc = await connect(supercluster.url(DECODE_SITE), name="test-decode-site")
    try:
        yield Sites(supercluster, prefill_nc, decode_nc)
    finally:
        await prefill_nc.close()
        await decode_nc.close()


class Gateways:
    """Starts gateway processes (waiting for their first heartbeat) and stops every one of them at the end."""

    def __init__(self, cluster: Supercluster, log_dir: Path) -> None:
        self.cluster = cluster
        self.log_dir = log_dir
        self.procs: list[GatewayProcess] = []

    async def prefill(
        self, cluster: str, instances: str, env: dict[str, str] | None = None, **settings: object
    ) -> tuple[GatewayProcess, InstanceLoad]:
        """A prefill gateway at the prefill site serving ``instances`` (comma-separated) of ``cluster``."""
        env = gateway_env(
            "prefill_gateway",
            self.cluster.url(PREFILL_SITE),
            site=PREFILL_SITE,
            cluster=cluster,
            instances=instances,
            heartbeat_s=0.1,
            **settings,
        ) | (env or {})
        return await self._start("prefill_gateway", env, PREFILL_SITE, instances.split(",")[0])

    async def decode(
        self, instance: str, env: dict[str, str] | None = None, **settings: object
    ) -> tuple[GatewayProcess, InstanceLoad]:
        """A decode gateway at the decode site."""
        env = gateway_env(
            "decode_gateway",
            self.cluster.url(DECODE_SITE),
            site=DECODE_SITE,
            instance=instance,
            heartbeat_s=0.1,
            **settings,
        ) | (env or {})
        return await self._start("decode_gateway", env, DECODE_SITE, instance)

    async def _start(
        self, kind: str, env: dict[str, str], site: str, instance: str
    ) -> tuple[GatewayProcess, InstanceLoad]:
        proc = GatewayProcess(kind, env, self.log_dir / f"{kind}-{instance}-{len(self.procs)}.log")
        self.procs.append(proc)
        nc = await connect(self.cluster.url(site), name=f"test-start-{instance}")
        try:
            proc.spawn()  # from this (main) thread: the child dies with it, never outlives the tests
            return proc, await proc.ready(nc, site, instance)
        finally:
            await nc.close()

    def stop_all(self) -> None:
        """Stop every process started here (SIGTERM, then SIGKILL)."""
        for proc in self.procs:
            proc.stop(timeout_s=10)


@pytest.fixture
def gateways(supercluster: Supercluster, tmp_path: Path) -> Iterator[Gateways]:
    """Gateway processes owned by one test."""
    owned = Gateways(supercluster, tmp_path)
    try:
        yield owned
    finally:
        owned.stop_all()


@pytest.fixture(scope="module")
def module_gateways(supercluster: Supercluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateways]:
    """Gateway processes shared by one test module."""
    owned = Gateways(supercluster, tmp_path_factory.mktemp("gateways"))
    try:
        yield owned
    finally:
        owned.stop_all()


@contextlib.asynccontextmanager
async def caller_for(sites: Sites, cluster: str) -> AsyncIterator[Caller]:
    """A router stand-in at the decode site that reaches ``cluster``'s prefill gateways."""
    async with Caller(sites.decode_nc, cluster=cluster) as caller:
        await caller.reachable(sites.prefill_nc)
        yield caller


async def next_load(
    nc: NatsClient, site: str, instance: str, after: float = 0.0, timeout_s: float = 10.0
) -> InstanceLoad:
    """The first heartbeat of ``site/instance`` sent after wall time ``after``."""
    sub = await nc.subscribe(subjects.load(site, instance))
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                load = instance_load_decoder.decode((await sub.next_msg(timeout=timeout_s)).data)
                if load.ts > after:
                    return load
    finally:
        await sub.unsubscribe()
