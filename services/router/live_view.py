"""The router's live view: instance heartbeats, link telemetry, and its own routed-but-not-yet-visible work.

Heartbeats (``InstanceLoad``) say what each instance holds as of its own clock. A request this router
just placed is not in them yet, so until an instance heartbeats a state that includes it (a heartbeat
stamped after the instance acknowledged the job) the router counts it itself: one decode slot less,
one more prefill job with its predicted prefill time added to the wait. Another router's requests
reach this view only through heartbeats, so two routers never count one request twice. The view
handed to ``libs/policy`` is built by ``ClusterView.from_loads`` and ``LinkTelemetry``, as in the
simulator.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from libs.common.messages import InstanceLoad, LinkStats
from libs.engine.profiles import HARDWARE, ModelProfile
from libs.policy import ClusterView, LinkTelemetry, TelemetryConfig


@dataclass(slots=True)
class Pending:
    """One job this router sent to an instance that its heartbeats may not show yet."""

    job_id: str
    routed_at: float  # wall clock when routed
    prefill_s: float  # predicted prefill time (prefill instances); 0 for decode
    acked_at: float | None = None  # wall clock when the instance acknowledged it (None: not yet)


class LiveView:
    """Latest heartbeat per instance, link telemetry, and this router's pending jobs per instance."""

    def __init__(
        self,
        decode_site: str,
        *,
        instance_ttl_s: float,
        pending_ttl_s: float,
        default_hardware: str,
        link_capacities: dict[tuple[str, str], float] | None = None,
        default_link_capacity_gbps: float | None = None,
        telemetry: TelemetryConfig | None = None,
    ) -> None:
        self.decode_site = decode_site
        self.instance_ttl_s = instance_ttl_s
        self.pending_ttl_s = pending_ttl_s
        self.default_hardware = default_hardware
        self.links = LinkTelemetry(telemetry, link_capacities, default_link_capacity_gbps)
        self._loads: dict[str, tuple[InstanceLoad, float]] = {}  # instance -> (heartbeat, received at, monotonic)
        self._pending: dict[str, dict[str, Pending]] = {}  # instance -> job id -> pending

    # --- intake ---------------------------------------------------------------------------

    def ingest_load(self, load: InstanceLoad) -> None:
        """Take a heartbeat; jobs it already reflects stop being counted by the router."""
        self._loads[load.instance] = (load, time.monotonic())
        jobs = self._pending.get(load.instance)
        if jobs:
            for job_id in [j for j, p in jobs.items() if p.acked_at is not None and load.ts >= p.acked_at]:
                del jobs[job_id]

    def ingest_link(self, stats: LinkStats, sender: str) -> None:
        """Take a LinkStats sample from one sending process."""
        self.links.ingest(stats, time.monotonic(), sender)

    def add_pending(self, instance: str, job_id: str, prefill_s: float = 0.0) -> None:
        """Count a job routed to ``instance`` until a heartbeat shows it."""
        self._pending.setdefault(instance, {})[job_id] = Pending(job_id, time.time(), prefill_s)

    def acknowledged(self, instance: str, job_id: str) -> None:
        """The instance took the job: its heartbeats stamped from now on include it."""
        pending = self._pending.get(instance, {}).get(job_id)
        if pending is not None:
            pending.acked_at = time.time()

    def release(self, instance: str, job_id: str) -> None:
        """The job ended or was refused: stop counting it."""
        jobs = self._pending.get(instance)
        if jobs:
            jobs.pop(job_id, None)

    def pending_count(self, instance: str) -> int:
        """Jobs this router counts on ``instance`` beyond its last heartbeat."""
        return len(self._pending.get(instance, ()))

    # --- reading --------------------------------------------------------------------------

    def alive(self, model: str | None = None) -> list[InstanceLoad]:
        """Heartbeats younger than the instance TTL (of ``model`` if given)."""
        horizon = time.monotonic() - self.instance_ttl_s
        return [load for load, at in self._loads.values() if at >= horizon and (model is None or load.model == model)]

    def is_alive(self, instance: str) -> bool:
        """True while ``instance`` heartbeats within the instance TTL."""
        entry = self._loads.get(instance)
        return entry is not None and entry[1] >= time.monotonic() - self.instance_ttl_s

    def load_of(self, instance: str) -> InstanceLoad | None:
        """The latest heartbeat of ``instance`` (alive or not)."""
        entry = self._loads.get(instance)
        return entry[0] if entry else None

    def models(self) -> set[str]:
        """Models that live instances serve."""
        return {load.model for load in self.alive() if load.model}

    def _with_pending(self, load: InstanceLoad, now: float) -> InstanceLoad:
        jobs = self._pending.get(load.instance)
        if not jobs:
            return load
        while jobs:  # oldest first (insertion order): only the expired front is visited
            oldest = next(iter(jobs.values()))
            if now - oldest.routed_at <= self.pending_ttl_s:
                break
            del jobs[oldest.job_id]
        if not jobs:
            return load
        if load.role == "decode":
            return msgspec.structs.replace(load, free_decode_slots=max(0, load.free_decode_slots - len(jobs)))
        added_s = sum(p.prefill_s for p in jobs.values())
        return msgspec.structs.replace(
            load, queue_depth=load.queue_depth + len(jobs), expected_wait_s=load.expected_wait_s + added_s
        )

    def cluster_view(
        self, model_name: str, profile: ModelProfile, *, exclude: Iterable[str] = (), local_only: bool = False
    ) -> ClusterView:
        """The policy's view of ``model_name``'s live instances, with this router's pending jobs counted."""
        now = time.time()
        skip = set(exclude)
        loads = [
            self._with_pending(load, now)
            for load in self.alive(model_name)
            if load.instance not in skip and not (local_only and load.site != self.decode_site)
        ]
        hardware_of = {ld.instance: ld.hardware if ld.hardware in HARDWARE else self.default_hardware for ld in loads}
        mono = time.monotonic()
        remote_sites = {ld.site for ld in loads if ld.role == "prefill" and ld.site != self.decode_site}
        links = [v for v in (self.links.view(site, self.decode_site, mono) for site in remote_sites) if v is not None]
        return ClusterView.from_loads(profile, self.decode_site, loads, hardware_of, links)

    def link_gbps(self, src_site: str) -> float | None:
        """The deliverable bandwidth from ``src_site`` to the decode site (None if unknown)."""
        view = self.links.view(src_site, self.decode_site, time.monotonic())
        return view.effective_gbps if view is not None else None
