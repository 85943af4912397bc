"""Run a lab's processes natively: start them in dependency order, wait until each serves, stop them all.

Children run in their own sessions (a Ctrl-C at the terminal reaches only the supervisor, which
stops them in reverse order) and get SIGTERM if the supervisor dies (Linux parent-death signal),
so no process outlives its lab. The supervisor keeps ``status.json`` in the run directory current.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from libs.common.errors import UpstreamTimeout
from libs.lab import nats_auth
from libs.lab.plan import PYTHON, LabSettings, ProcessSpec, plan, router_name
from libs.lab.readiness import Probes
from libs.lab.runstate import start_ticks, write_status
from libs.lab.servers import die_with_parent, find_nats_server, find_redis_server
from libs.lab.topology import Topology

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # SIGTERM, then SIGKILL after this long
_LOCAL = "127.0.0.1"
_LAB_PORTS_FROM = 10_000


class NativeAddresses:
    """Every process on 127.0.0.1, each port a distinct free one; files under the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._ports: dict[tuple[str, str], int] = {}

    def host(self, process: str) -> str:
        return _LOCAL

    def bind(self, process: str) -> str:
        return _LOCAL

    def port(self, process: str, what: str) -> int:
        key = (process, what)
        if key not in self._ports:
            self._ports[key] = _lab_port(set(self._ports.values()))
        return self._ports[key]

    def path(self, process: str, what: str) -> str:
        if what == "conf":
            return str(self.run_dir / "config" / f"{process}.conf")
        return str(self.run_dir / "data" / process)


@dataclass
class _Child:
    spec: ProcessSpec
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    ticks: int | None = None
    ready: bool = False
    exit_code: int | None = None


class Lab:
    """The processes of one topology, supervised from this process."""

    def __init__(self, topology: Topology, run_dir: Path, settings: LabSettings) -> None:
        self.topology, self.run_dir, self.settings = topology, run_dir, settings
        self.specs = plan(topology, NativeAddresses(run_dir), settings)
        self.children = {s.name: _Child(s, run_dir / "logs" / f"{s.name}.log") for s in self.specs}
        self.state = "starting"
        self.error: str | None = None
        self._levels = _levels(self.specs)
        self._saving: asyncio.Lock | None = None

    def prepare(self) -> None:
        """Create the run directory's folders and write the config files (before the event loop runs)."""
        for folder in ("logs", "config", "data"):
            (self.run_dir / folder).mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            for path, text in spec.files.items():
                Path(path).write_text(text)
            if spec.role in ("nats", "redis"):
                (self.run_dir / "data" / spec.name).mkdir(exist_ok=True)
        write_status(self.run_dir, self.status())

    async def start(self, timeout_s: float) -> None:
        """Start every process once its dependencies serve; return when all serve (UpstreamTimeout otherwise)."""
        ready = {name: asyncio.Event() for name in self.children}
        probes = Probes()

        async def bring_up(child: _Child) -> None:
            for dep in child.spec.after:
                await ready[dep].wait()
            await self._launch(child)
            await self._until_ready(child, probes)
            child.ready = True
            ready[child.spec.name].set()
            await self._save()

        tasks = [asyncio.create_task(bring_up(c)) for c in self.children.values()]
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*tasks)
        except TimeoutError:
            waiting = [c for c in self.children.values() if not c.ready]
            self._fail(f"not ready after {timeout_s:g}s: {', '.join(c.spec.name for c in waiting)}" + _tail(waiting[0]))
        except UpstreamTimeout as e:
            self._fail(e.message)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await probes.close()
        self.state = "ready"
        await self._save()

    async def wait_exits(self) -> _Child:
        """Wait until some child exits and return it (the lab keeps running; status shows it)."""
        pending = [c for c in self.children.values() if c.proc is not None and c.exit_code is None]
        waits = {asyncio.ensure_future(c.proc.wait()): c for c in pending}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        child = waits[done.pop()]
        child.exit_code = child.proc.returncode
        await self._save()
        return child

    async def stop(self) -> None:
        """Stop every process, the most dependent first (SIGTERM, then SIGKILL); remove the data folder."""
        self.state = "stopping"
        await self._save()
        for level in sorted(set(self._levels.values()), reverse=True):
            group = [c for c in self.children.values() if self._levels[c.spec.name] == level]
            await asyncio.gather(*(self._stop_child(c) for c in group))
        self.state = "stopped" if self.error is None else "failed"
        await asyncio.to_thread(shutil.rmtree, self.run_dir / "data", True)
        await self._save()

    def signal(self, name: str, signum: int) -> None:
        """Send ``signum`` to the running child ``name`` (kill -9, SIGSTOP, SIGCONT); the status shows a death later."""
        proc = self.children[name].proc
        if proc is None or proc.returncode is not None:
            raise ProcessLookupError(f"{name} is not running")
        proc.send_signal(signum)

    async def restart(self, name: str, timeout_s: float) -> None:
        """Stop child ``name`` if it runs (SIGTERM, then SIGKILL), start it again, return once it serves."""
        child = self.children[name]
        await self._stop_child(child)
        child.ready = False
        await self._save()
        probes = Probes()
        try:
            await self._launch(child)
            child.exit_code = None
            async with asyncio.timeout(timeout_s):
                await self._until_ready(child, probes)
        except TimeoutError:
            raise UpstreamTimeout(f"{name} not ready {timeout_s:g}s after its restart" + _tail(child)) from None
        finally:
            await probes.close()
        child.ready = True
        await self._save()

    def status(self) -> dict:
        """The status file's content."""
        by_role = {}
        for s in self.specs:
            by_role.setdefault(s.role, []).append(s)
        router_urls = {s.name: f"http://{_LOCAL}:{s.ports['http']}" for s in by_role.get("router", [])}
        routers = {site: router_urls[router_name(site)] for site in self.topology.services.routers}
        first_router = self.topology.services.routers[0]
        return {
            "state": self.state,
            "error": self.error,
            "topology": self.topology.name,
            "topology_source": self.topology.source,
            "model": self.topology.model,
            "threshold_tokens": self.topology.router.threshold_tokens,
            "run_dir": str(self.run_dir),
            "supervisor": {"pid": os.getpid(), "start_ticks": start_ticks(os.getpid())},
            "router_url": routers.get(first_router),
            "routers": routers,
            "router_urls": router_urls,  # every router process (replicas too) by name
            "api_key": self.settings.api_key,
            "sites": {
                s.site: {
                    "name": s.site,
                    "nats_url": nats_auth.client_url(_LOCAL, s.ports["client"], self.settings.nats_passwords),
                    "monitor_url": f"http://{_LOCAL}:{s.ports['monitor']}",
                }
                for s in by_role.get("nats", [])
            },
            "redis_url": next(f"redis://{_LOCAL}:{s.ports['redis']}/0" for s in by_role["redis"]),
            "links": [
                {
                    "sites": list(link.sites),
                    "process": f"wan-{link.sites[0]}-{link.sites[1]}",
                    "control_url": f"http://{_LOCAL}:{self.children[f'wan-{link.sites[0]}-{link.sites[1]}'].spec.ports['control']}",
                    "gbps": link.gbps,
                    "rtt_ms": link.rtt_ms,
                    "loss_pct": link.loss_pct,
                }
                for link in self.topology.links
            ],
            "processes": [
                {
                    "name": c.spec.name,
                    "role": c.spec.role,
                    "site": c.spec.site,
                    "pid": c.proc.pid if c.proc else None,
                    "start_ticks": c.ticks,
                    "ready": c.ready,
                    "exit_code": c.exit_code,
                    "log": str(c.log_path),
                }
                for c in self.children.values()
            ],
        }

    async def _save(self) -> None:
        """Write the status file (one writer at a time, so the newest state is the one kept)."""
        if self._saving is None:
            self._saving = asyncio.Lock()
        async with self._saving:
            status = self.status()
            await asyncio.to_thread(write_status, self.run_dir, status)

    async def _launch(self, child: _Child) -> None:
        spec = child.spec
        argv = [_executable(spec.argv[0]), *spec.argv[1:]]
        with open(child.log_path, "ab") as log_file:  # noqa: ASYNC230 (opening a log file: no wait)
            child.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,
                env={**os.environ, **spec.env},
            )
        child.ticks = start_ticks(child.proc.pid)
        log.info("started %s (pid %d)", spec.name, child.proc.pid)

    async def _until_ready(self, child: _Child, probes: Probes) -> None:
        probe = asyncio.ensure_future(probes.ready(child.spec.ready))
        exited = asyncio.ensure_future(child.proc.wait())
        try:
            await asyncio.wait([probe, exited], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (probe, exited):
                task.cancel()
        if not probe.done() or probe.cancelled():
            child.exit_code = child.proc.returncode
            raise UpstreamTimeout(
                f"{child.spec.name} exited with code {child.exit_code} before it was ready" + _tail(child)
            )

    async def _stop_child(self, child: _Child) -> None:
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning("%s ignored SIGTERM for %gs: killed", child.spec.name, STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        child.exit_code = proc.returncode

    def _fail(self, message: str) -> None:
        self.state, self.error = "failed", message
        raise UpstreamTimeout(f"lab {self.topology.name}: {message}")


def _lab_port(taken: set[int]) -> int:
    """A free port below the kernel's ephemeral range.

    The plan picks every port before the processes bind them; ports from the ephemeral range (what
    binding port 0 gives) may meanwhile go to any outgoing connection or to another test's server.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    while True:
        port = random.randrange(_LAB_PORTS_FROM, max(low, _LAB_PORTS_FROM + 1000))
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((_LOCAL, port))
            except OSError:
                continue
        return port


def _executable(name: str) -> str:
    if name == PYTHON:
        return sys.executable
    return find_nats_server() if name == "nats-server" else find_redis_server()


def _levels(specs: list[ProcessSpec]) -> dict[str, int]:
    """Depth of each process in the ``after`` graph (0: depends on nothing)."""
    levels: dict[str, int] = {}
    for spec in specs:  # the plan lists dependencies first
        levels[spec.name] = 1 + max((levels[d] for d in spec.after), default=-1)
    return levels


def _tail(child: _Child, lines: int = 15) -> str:
    try:
        text = child.log_path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\n--- last lines of {child.log_path} ---\n" + "\n".join(text) if text else ""
