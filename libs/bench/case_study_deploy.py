"""The case study's three deployments as labs: the planner's configurations, scaled in time and bytes, run one at a time.

Each configuration ``prfaas plan --case-study`` chose (PrfaaS-PD, homogeneous PD, naive heterogeneous)
becomes a topology built in code: simulated H200 PrfaaS instances at ``dc-a`` (none for homogeneous), simulated H20
prefill and decode instances at ``dc-b``, the router at ``dc-b`` with the configuration's policy
(``static-threshold`` with the planned t, ``local-only``, ``remote-only``). Every modelled duration is
multiplied by ``time_scale`` and every size by ``byte_scale``; the relay's link is scaled to match
(bandwidth x byte_scale / time_scale, RTT x time_scale), so rates are 1 / time_scale times the
paper's and every ratio is kept. The router's slow timescale is off: it would re-plan t from the
scaled link read as paper units (the lab's processes inherit this process's environment).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from pathlib import Path

from libs.common.errors import UpstreamTimeout
from libs.lab.supervisor import Lab
from libs.lab.topology import Topology, topology_from_dict
from libs.lab.up import secured_lab
from libs.planner.scenarios import CONFIG_POLICIES, plans
from libs.planner.search import PlanInputs
from libs.planner.simulator import SimSpec

log = logging.getLogger(__name__)

PRFAAS_SITE, PD_SITE = "dc-a", "dc-b"
SIM_LINK_RTT_S = next(f.default for f in fields(SimSpec) if f.name == "link_rtt_s")  # what the simulator assumes
_PER_PROCESS = 4  # simulated prefill instances per gateway process, at most
_START_ATTEMPTS = 2  # a lab's ports are chosen before its processes bind them: another process may take one first
_READY_TIMEOUT_S = 90.0
CHILD_ENV = {"ROUTER_REPLAN_INTERVAL_S": "0"}


@dataclass(frozen=True)
class Scales:
    """How the paper's deployment is shrunk onto this machine."""

    time_scale: float = 0.35
    byte_scale: float = 0.001
    decode_chunk: int = 32

    def live_rps(self, paper_rps: float) -> float:
        """An arrival rate in the paper's req/s as the lab runs it."""
        return paper_rps / self.time_scale

    def paper_rps(self, live_rps: float) -> float:
        """A lab's rate in the paper's req/s."""
        return live_rps * self.time_scale

    def paper_s(self, live_s: float) -> float:
        """A lab's duration in the paper's seconds."""
        return live_s / self.time_scale

    def live_s(self, paper_s: float) -> float:
        """A duration in the paper's seconds as the lab runs it."""
        return paper_s * self.time_scale

    def link_gbps(self, paper_gbps: float) -> float:
        """The relay's bandwidth for a modelled link: bytes shrink by byte_scale in time_scale of the time."""
        return paper_gbps * self.byte_scale / self.time_scale

    def paper_gbps(self, live_gbps: float) -> float:
        """A lab's measured bandwidth in the paper's Gbps."""
        return live_gbps * self.time_scale / self.byte_scale


@dataclass(frozen=True)
class Deployment:
    """One planned configuration and the planner's figures for it (paper units)."""

    name: str
    policy: str
    threshold_tokens: int
    n_prfaas: int
    n_p: int
    n_d: int
    lambda_max: float
    offload_fraction: float
    egress_gbps: float


def deployments(inputs: PlanInputs) -> list[Deployment]:
    """The three configurations ``prfaas plan`` chooses, with the policy the simulator routes each by."""
    out = []
    for name, result in plans(inputs).items():
        dep, tp = result.deployment, result.throughput
        threshold = tp.threshold_tokens
        if threshold is None:  # the baselines' policies ignore t; the router requires one
            threshold = inputs.workload.max_tokens if dep.n_prfaas == 0 else 0
        out.append(
            Deployment(
                name=name,
                policy=CONFIG_POLICIES[name],
                threshold_tokens=int(threshold),
                n_prfaas=dep.n_prfaas,
                n_p=dep.n_p,
                n_d=dep.n_d,
                lambda_max=tp.lambda_max,
                offload_fraction=tp.offload_fraction,
                egress_gbps=tp.egress_gbps,
            )
        )
    return out


def _prefill_group(count: int, hardware: str, scales: Scales) -> dict:
    processes = -(-count // _PER_PROCESS)
    return {
        "role": "prefill",
        "count": count,
        "backend": "simulated",
        "hardware": hardware,
        "time_scale": scales.time_scale,
        "byte_scale": scales.byte_scale,
        "per_process": -(-count // processes),
    }


def topology(dep: Deployment, inputs: PlanInputs, scales: Scales) -> Topology:
    """The lab of one deployment: PrfaaS instances at dc-a (if any), the PD cluster and the router at dc-b."""
    pd = []
    if dep.n_p:
        pd.append(_prefill_group(dep.n_p, inputs.pd_hw.name, scales))
    pd.append(
        {
            "role": "decode",
            "count": dep.n_d,
            "backend": "simulated",
            "hardware": inputs.pd_hw.name,
            "time_scale": scales.time_scale,
            "byte_scale": scales.byte_scale,
            "decode_chunk": scales.decode_chunk,
        }
    )
    # Homogeneous PD keeps an empty PrfaaS site: a lab's NATS server alone (JetStream in a one-node cluster)
    # never becomes healthy, so every lab has two sites.
    prfaas = [_prefill_group(dep.n_prfaas, inputs.prfaas_hw.name, scales)] if dep.n_prfaas else []
    sites = {
        PRFAAS_SITE: {"clusters": {"prfaas": {"kind": "prfaas", "instances": prfaas}} if prfaas else {}},
        PD_SITE: {"clusters": {"pd": {"kind": "pd", "instances": pd}}},
    }
    links = [
        {
            "sites": [PRFAAS_SITE, PD_SITE],
            "gbps": scales.link_gbps(inputs.link_gbps),
            "rtt_ms": SIM_LINK_RTT_S * 1e3 * scales.time_scale,
        }
    ]
    raw = {
        "name": f"case-study-{dep.name.replace('_', '-')}",
        "description": f"{dep.name}: {dep.n_prfaas} PrfaaS + {dep.n_p}/{dep.n_d} PD, time x{scales.time_scale:g}",
        "model": inputs.model.name,
        "sites": sites,
        "services": {"redis": PD_SITE, "kv_index": PD_SITE, "routers": [PD_SITE]},
        "router": {"policy": dep.policy, "threshold_tokens": dep.threshold_tokens},
        "links": links,
    }
    return topology_from_dict(raw, source=f"case study ({dep.name})")


@dataclass(frozen=True)
class RunningLab:
    """A started lab: where its router answers, the NATS server at the router's site, its processes' pids."""

    lab: Lab
    router_url: str
    nats_url: str
    pids: dict[str, int]
    link_control_url: str | None


@contextlib.asynccontextmanager
async def running(topo: Topology, run_dir: Path | None = None) -> AsyncIterator[RunningLab]:
    """Start the lab (a second try on a fresh port plan if the first one fails), yield it, stop every process."""
    base = Path(tempfile.mkdtemp(prefix="prfaas-case-study-")) if run_dir is None else run_dir
    for attempt in range(_START_ATTEMPTS):
        lab = secured_lab(topo, base / f"{topo.name}-{attempt}", "WARNING")
        lab.prepare()
        try:
            with _inherited_env(CHILD_ENV):
                await lab.start(_READY_TIMEOUT_S)
            break
        except UpstreamTimeout as e:
            await lab.stop()
            if attempt + 1 == _START_ATTEMPTS:
                raise
            log.warning("lab %s did not start (%s); trying once more", topo.name, e.message.splitlines()[0])
    status = lab.status()
    try:
        yield RunningLab(
            lab=lab,
            router_url=status["router_url"],
            nats_url=status["sites"][PD_SITE]["nats_url"],
            pids={p["name"]: p["pid"] for p in status["processes"] if p["pid"] is not None},
            link_control_url=status["links"][0]["control_url"] if status["links"] else None,
        )
    finally:
        await lab.stop()
        if run_dir is None:
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _inherited_env(values: dict[str, str]):
    """Set environment variables while the lab's processes start (they inherit them), then restore them."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
