"""A two-site deployment for end-to-end router tests: real gateway processes on the session's supercluster.

Reference-model gateways (real tokens): PrfaaS prefill at ``dc-prfaas``, local prefill and decode at
``dc-pd``. The KV index and the router run in the test's process, against a Redis of the test, so a
test can look at the router's state; everything else is a real process stopped by its owner.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

from libs.bench.gateways import GatewayProcess, gateway_env
from libs.lab.servers import Supercluster

PD, PRFAAS = "dc-pd", "dc-prfaas"


class Fleet:
    """Gateway processes of one module or test; ``stop_all`` stops every one of them."""

    def __init__(self, cluster: Supercluster, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.cluster = cluster
        self.log_dir = log_dir
        self.env = env or {}
        self.procs: dict[str, GatewayProcess] = {}

    def start(self, *specs: tuple[str, str, str, dict]) -> None:
        """Start ``(kind, site, instance, settings)`` gateways and wait for their first heartbeats (no event loop running)."""
        asyncio.run(self.start_async(*specs))

    async def start_async(self, *specs: tuple[str, str, str, dict]) -> None:
        """Start gateways from a running event loop (the processes die with this thread)."""
        from libs.common.bus import connect

        waits = []
        conns = []
        for kind, site, instance, settings in specs:
            defaults = {"site": site, "heartbeat_s": 0.1, "backend": "reference"}
            if kind == "prefill_gateway":
                defaults |= {"cluster": "pd" if site == PD else "prfaas", "instances": instance}
            else:
                defaults |= {"instance": instance}
            env = gateway_env(kind, self.cluster.url(site), **(defaults | settings)) | self.env
            proc = GatewayProcess(kind, env, self.log_dir / f"{kind}-{instance}.log")
            self.procs[instance] = proc
            proc.spawn()
            nc = await connect(self.cluster.url(site), name=f"wait-{instance}")
            conns.append(nc)
            waits.append(proc.ready(nc, site, instance))
        try:
            await asyncio.gather(*waits)
        finally:
            for nc in conns:
                await nc.close()

    def stop_all(self) -> None:
        """SIGTERM then SIGKILL every process."""
        for proc in self.procs.values():
            proc.stop(timeout_s=10)


def fleet(cluster: Supercluster, log_dir: Path, specs, env: dict[str, str] | None = None) -> Iterator[Fleet]:
    """Start a fleet for a fixture and stop it afterwards."""
    owned = Fleet(cluster, log_dir, env)
    try:
        owned.start(*specs)
        yield owned
    finally:
        owned.stop_all()
