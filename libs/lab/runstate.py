"""A lab's run directory: where it is, its status file, and whether the processes it names still live.

Layout: ``status.json`` (written by the supervisor, read by ``lab status|down|link``), ``lab.log``
(the detached supervisor's output), ``logs/<process>.log``, ``config/`` (NATS configs),
``data/`` (JetStream and Redis files, removed after a clean stop).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path

from libs.common.errors import ConfigError, NotFound, UpstreamTimeout

STATUS = "status.json"
SUPERVISOR_LOG = "lab.log"
RUN_DIR_ENV = "PRFAAS_LAB_DIR"
STOP_TIMEOUT_S = 60.0  # a supervisor stops its children in order, each within its own deadline


def default_run_dir() -> Path:
    """``$PRFAAS_LAB_DIR``, else ``<temp dir>/prfaas-lab-<uid>`` (one lab per user and temp dir)."""
    configured = os.environ.get(RUN_DIR_ENV, "").strip()
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"prfaas-lab-{os.getuid()}"


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def alive(pid: int, ticks: int | None) -> bool:
    """True if ``pid`` runs and is the process that started at ``ticks`` (not a reused pid), and is no zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and (ticks is None or start_ticks(pid) == ticks)


def write_status(run_dir: Path, status: dict) -> None:
    """Replace the status file atomically."""
    tmp = run_dir / (STATUS + ".tmp")
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    tmp.replace(run_dir / STATUS)


def read_status(run_dir: Path) -> dict:
    """The status file of the lab in ``run_dir`` (NotFound if there is none)."""
    try:
        return json.loads((run_dir / STATUS).read_text())
    except FileNotFoundError:
        raise NotFound(f"no lab in {run_dir} (start one with `prfaas lab up`)") from None
    except ValueError as e:
        raise ConfigError(f"{run_dir / STATUS}: not a lab status file: {e}") from None


def running_status(run_dir: Path) -> dict | None:
    """The status of a lab whose supervisor still runs in ``run_dir``, else None."""
    try:
        status = read_status(run_dir)
    except (NotFound, ConfigError):
        return None
    supervisor = status.get("supervisor") or {}
    return status if alive(supervisor.get("pid", -1), supervisor.get("start_ticks")) else None


def router_site(status: dict) -> str:
    """The site of the lab's (first) router, whose NATS server carries its decision events."""
    return next(site for site, url in status["routers"].items() if url == status["router_url"])


def router_nats_url(run_dir: Path) -> str:
    """The NATS URL at the router's site of the lab running in ``run_dir`` (NotFound if none runs)."""
    status = running_status(run_dir)
    if status is None:
        raise NotFound(f"no lab runs in {run_dir}: start one with `prfaas lab up --detach`, or give --nats URL")
    return status["sites"][router_site(status)]["nats_url"]


def stop_lab(run_dir: Path) -> dict | None:
    """Stop the lab in ``run_dir`` (SIGTERM its supervisor, wait, kill any child it left); its status, None if none ran."""
    try:
        status = read_status(run_dir)
    except NotFound:
        return None
    supervisor = status["supervisor"]
    supervised = alive(supervisor["pid"], supervisor["start_ticks"])
    if supervised:
        os.kill(supervisor["pid"], signal.SIGTERM)
        _wait_gone([(supervisor["pid"], supervisor["start_ticks"])], STOP_TIMEOUT_S)
    leftovers = [
        (p["pid"], p["start_ticks"])
        for p in status["processes"]
        if p["pid"] is not None and alive(p["pid"], p["start_ticks"])
    ]
    for pid, _ in leftovers:  # only if the supervisor died without stopping them
        os.kill(pid, signal.SIGKILL)
    _wait_gone(leftovers, 5.0)
    return status if supervised or leftovers else None


def _wait_gone(processes: list[tuple[int, int | None]], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while any(alive(pid, ticks) for pid, ticks in processes):
        if time.monotonic() > end:
            raise UpstreamTimeout(f"processes {[pid for pid, _ in processes]} still run after {timeout_s:g}s")
        time.sleep(0.05)
