"""What a router knows when it decides: instances, links and the model; and the request itself.

Everything here is an immutable snapshot. The live router builds one from heartbeats, link
telemetry and a KV-index lookup; the simulator builds one from its own state. Instance names are
unique across sites.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from libs.common.messages import InstanceLoad, KvLookupReply, Role
from libs.engine.profiles import HardwareProfile, ModelProfile, hardware_profile


@dataclass(frozen=True, slots=True)
class InstanceView:
    """One instance: where it is, what it does, on which hardware, and how loaded it is."""

    name: str
    site: str
    role: Role
    hardware: HardwareProfile
    queue_depth: int = 0
    expected_wait_s: float = 0.0  # until a new job would start (prefill) or get a slot (decode)
    free_decode_slots: int = 0


@dataclass(frozen=True, slots=True)
class LinkView:
    """One direction of an inter-site link as a router knows it (:class:`LinkTelemetry` builds it from LinkStats).

    ``capacity_gbps`` is what the pair is provisioned or paced to: a paced sender never delivers
    more, so goodput cannot reveal a higher capacity. ``deliverable_gbps`` is the estimate of what
    the link delivers now when telemetry shows it below capacity (a degraded path); ``None`` means
    nothing suggests less than the capacity.
    """

    src_site: str
    dst_site: str
    capacity_gbps: float
    deliverable_gbps: float | None = None
    goodput_gbps: float = 0.0  # smoothed goodput being delivered now
    utilization: float = 0.0  # goodput over effective_gbps (smoothed)
    rtt_s: float = 0.0
    queue_delay_s: float = 0.0  # round trip above the path's base RTT: time KV waits in the senders' windows
    bytes_in_flight: int = 0  # sent and not yet acknowledged, summed over the senders
    active_transfers: int = 0  # KV transfers currently using this link
    mean_transfer_bytes: int = 0  # bytes per completed transfer, recently (0: unknown)
    age_s: float = 0.0  # since the newest telemetry sample (inf: never heard from)

    @property
    def effective_gbps(self) -> float:
        """Bandwidth a planner can count on: the deliverable estimate, else capacity (never below 1 Mbps)."""
        gbps = self.capacity_gbps if self.deliverable_gbps is None else min(self.deliverable_gbps, self.capacity_gbps)
        return max(gbps, 1e-3)

    def share_bytes_per_s(self) -> float:
        """Bandwidth a new transfer can expect: the idle part, or at least an equal share."""
        bytes_per_s = self.effective_gbps * 1e9 / 8
        idle = bytes_per_s * max(0.0, 1.0 - self.utilization)
        # Telemetry without a transfer count: a busy link has at least one transfer on it.
        active = self.active_transfers or (1 if self.utilization > 0.05 or self.bytes_in_flight else 0)
        return max(idle, bytes_per_s / (active + 1))

    @property
    def backlog_s(self) -> float:
        """Seconds KV already handed to the link waits before delivery: queueing delay, or in-flight bytes / rate."""
        return max(self.queue_delay_s, self.bytes_in_flight * 8 / (self.effective_gbps * 1e9))

    def delay_s(self, prefilling: int) -> float:
        """Seconds a new transfer waits behind the link's backlog (an estimate from what telemetry shows).

        Senders hold KV beyond their window, so in-flight bytes show only part of a backlog. Active
        transfers beyond the ``prefilling`` ones (their prefill is over, their KV is still on the
        wire) each count for half a mean transfer at the deliverable rate, on top of ``backlog_s``.
        """
        lagging = self.active_transfers - prefilling
        if lagging <= 0 or self.mean_transfer_bytes <= 0:
            return self.backlog_s
        return self.backlog_s + lagging * self.mean_transfer_bytes * 4 / (self.effective_gbps * 1e9)


@dataclass(frozen=True)
class ClusterView:
    """A snapshot of the clusters one router serves, indexed for fast decisions."""

    model: ModelProfile
    decode_site: str  # the PD cluster's site: every request decodes here
    instances: tuple[InstanceView, ...]
    links: tuple[LinkView, ...] = ()
    unavailable: tuple[str, ...] = ()  # why PrfaaS sites are left out (a link's open breaker), for the reason
    local_prefill: tuple[InstanceView, ...] = field(init=False)
    remote_prefill: Mapping[str, tuple[InstanceView, ...]] = field(init=False)
    decode: tuple[InstanceView, ...] = field(init=False)
    _links: Mapping[tuple[str, str], LinkView] = field(init=False, repr=False)
    _max_batch: dict[str, int] = field(init=False, repr=False, default_factory=dict)  # memo per hardware
    _decode_ties: list[tuple[InstanceView, ...]] = field(init=False, repr=False, default_factory=list)  # memo

    def __post_init__(self) -> None:
        remote: dict[str, list[InstanceView]] = {}
        local: list[InstanceView] = []
        decode: list[InstanceView] = []
        for inst in self.instances:
            if inst.role == "decode":
                if inst.site == self.decode_site:
                    decode.append(inst)
            elif inst.site == self.decode_site:
                local.append(inst)
            else:
                remote.setdefault(inst.site, []).append(inst)
        object.__setattr__(self, "local_prefill", tuple(local))
        object.__setattr__(self, "remote_prefill", MappingProxyType({s: tuple(v) for s, v in remote.items()}))
        object.__setattr__(self, "decode", tuple(decode))
        object.__setattr__(self, "_links", MappingProxyType({(ln.src_site, ln.dst_site): ln for ln in self.links}))

    def link(self, src_site: str, dst_site: str) -> LinkView | None:
        """The link from ``src_site`` to ``dst_site``, if the view knows one."""
        return self._links.get((src_site, dst_site))

    def decode_ties(self) -> tuple[InstanceView, ...]:
        """Decode instances with (nearly) the most free slots, or else the (nearly) shortest wait."""
        if not self._decode_ties:
            pool = self.decode
            most_free = max((inst.free_decode_slots for inst in pool), default=0)
            if most_free > 0:
                floor = most_free - max(1, most_free // 10)
                ties = tuple(inst for inst in pool if inst.free_decode_slots > floor)
            else:
                least = min((inst.expected_wait_s for inst in pool), default=0.0)
                ties = tuple(inst for inst in pool if inst.expected_wait_s <= least * 1.05 + 1e-3)
            self._decode_ties.append(ties)
        return self._decode_ties[0]

    def first_step_s(self, decode: InstanceView) -> float:
        """Predicted time of a new request's first decode step on ``decode`` (its batch plus one)."""
        hw = decode.hardware
        max_batch = self._max_batch.get(hw.name)
        if max_batch is None:
            max_batch = self._max_batch[hw.name] = self.model.max_batch(hw)
        return self.model.decode_step_s(max(1, max_batch - decode.free_decode_slots + 1), hw)

    @classmethod
    def from_loads(
        cls,
        model: ModelProfile,
        decode_site: str,
        loads: Iterable[InstanceLoad],
        hardware_of: Mapping[str, str],
        links: Iterable[LinkView] = (),
        unavailable: Iterable[str] = (),
    ) -> ClusterView:
        """Build a view from load heartbeats; ``hardware_of`` maps instance name to hardware profile name."""
        instances = tuple(
            InstanceView(
                name=load.instance,
                site=load.site,
                role=load.role,
                hardware=hardware_profile(hardware_of[load.instance]),
                queue_depth=load.queue_depth,
                expected_wait_s=load.expected_wait_s,
                free_decode_slots=load.free_decode_slots,
            )
            for load in loads
            if load.instance in hardware_of
        )
        return cls(
            model=model,
            decode_site=decode_site,
            instances=instances,
            links=tuple(links),
            unavailable=tuple(unavailable),
        )


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """One request to place: its length, the usable cached prefix per instance (tokens), its TTFT target if any."""

    request_id: str
    prompt_tokens: int
    output_tokens: int = 1024
    cached_tokens: Mapping[str, int] = field(default_factory=dict)  # instance name -> usable prefix tokens
    ttft_slo_s: float | None = None  # the client's time-to-first-token target (cost-model prefers options meeting it)

    @classmethod
    def from_lookup(
        cls,
        request_id: str,
        prompt_tokens: int,
        reply: KvLookupReply,
        block_size: int,
        output_tokens: int = 1024,
        ttft_slo_s: float | None = None,
    ) -> RouteRequest:
        """Build a request from a KV-index lookup reply (usable blocks times the block size)."""
        cached = {p.instance: min(prompt_tokens, p.usable_blocks * block_size) for p in reply.instances}
        return cls(request_id, prompt_tokens, output_tokens, MappingProxyType(cached), ttft_slo_s)
