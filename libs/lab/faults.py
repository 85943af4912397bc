"""Faults injected into a running lab supervised by this process: kill -9, SIGSTOP/SIGCONT, restarts, the link cut or lossy.

A process is named as the plan names it (``prefill-prfaas-0``, ``decode-pd-d1``, ``router-dc-b-1``,
``kv-index``, ``redis``, ``nats-dc-a``). A restart stops the process if it still runs (SIGTERM, then
SIGKILL) and starts it again from its spec, returning once it serves: Redis comes back empty (the lab
saves nothing), a NATS server keeps its JetStream folder. Link changes go to the link's relay as
``prfaas lab link`` sends them.
"""

from __future__ import annotations

import asyncio
import signal

from libs.lab.supervisor import Lab
from libs.lab.wan_server import change_link

RESTART_TIMEOUT_S = 60.0  # a restarted process serves within this long (a Python service loads its model first)


class LabFaults:
    """What can go wrong in ``lab``, on demand."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab

    def names(self, role: str, site: str | None = None) -> list[str]:
        """The processes of ``role`` (``prefill_gateway``, ``decode_gateway``, ``router``, ...), at ``site`` if given."""
        return [s.name for s in self.lab.specs if s.role == role and (site is None or s.site == site)]

    def kill(self, name: str) -> None:
        """kill -9: the process dies at once, without closing anything."""
        self.lab.signal(name, signal.SIGKILL)

    def pause(self, name: str) -> None:
        """SIGSTOP: the process hangs (its sockets stay open and silent)."""
        self.lab.signal(name, signal.SIGSTOP)

    def resume(self, name: str) -> None:
        """SIGCONT after :meth:`pause`."""
        self.lab.signal(name, signal.SIGCONT)

    async def restart(self, name: str, timeout_s: float = RESTART_TIMEOUT_S) -> None:
        """Stop ``name`` if it runs, start it again, return once it serves."""
        await self.lab.restart(name, timeout_s)

    async def link(self, changes: dict) -> dict:
        """Change the first link (``{"up": False}`` cuts it, ``{"loss_pct": 1.0}``); the relay's figures after."""
        control = self.lab.status()["links"][0]["control_url"]
        return await asyncio.to_thread(change_link, control, changes)
