"""The router's live view: instance heartbeats, link telemetry, and its own placements the heartbeats lag behind.

Heartbeats (``InstanceLoad``) say what each instance holds as of its own clock. Each attempt this
router makes is a ``Placement`` on two instances, owned here: placed, acknowledged by each, its
prefill done, closed. A job is in an instance's heartbeats from the first one stamped after the
instance acknowledged it until the first one stamped after it ended, and the router corrects the
heartbeat for what it knows better: a job placed but not yet shown counts one decode slot less or one
more prefill job (its predicted prefill added to the wait); a job shown but already over counts the
other way, so the request arriving right after a remote prefill ends does not see that prefill's
queue. Another router's requests reach this view only through heartbeats, so two routers never count
one request twice. The view handed to ``libs/policy`` is built by ``ClusterView.from_loads`` and
``LinkTelemetry``, as in the simulator.

Each pair into this site has a breaker (``libs.policy.breaker``): heartbeats and LinkStats say the
site is heard, and each remote placement gives its verdict on the link (its KV crossed, the link
failed it, or neither) once; a PrfaaS site whose breaker does not admit an attempt now is left out of
the view, which carries the breaker's note for the decision's reason.

The KV path of each pair into this site (``kv_paths``: the pairs with a configured capacity into it
and those heard from) is down while its breaker says so (``LinkBreakers.path_down``) or while no
LinkStats of the pair arrived for ``linkstats_silence_s`` (its senders publish every second while
they run): the router's readiness and its ``prfaas_router_kv_path_up`` gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from libs.common.messages import InstanceLoad, LinkStats
from libs.engine.profiles import HARDWARE, ModelProfile
from libs.policy import ClusterView, LinkTelemetry, TelemetryConfig
from libs.policy.breaker import BreakerConfig, LinkBreakers, LinkState

LINKSTATS_SILENCE_S = 5.0  # a pair whose senders published nothing this long has no KV path (they publish every 1 s)


@dataclass(frozen=True, slots=True)
class KvPath:
    """One pair's KV path into the router's site now: up, or why no transfer can succeed."""

    src_site: str
    dst_site: str
    down_why: str = ""

    @property
    def up(self) -> bool:
        """True while a transfer on the pair may succeed."""
        return not self.down_why


@dataclass(slots=True)
class _Leg:
    """One instance's side of a placement, on this router's wall clock (what heartbeats are stamped with)."""

    instance: str
    placed_at: float
    prefill_s: float  # the predicted prefill a prefill leg adds to its instance's wait; 0 for a decode leg
    acked_at: float | None = None
    ended_at: float | None = None

    def correction(self, ts: float) -> int:
        """+1 if a heartbeat stamped ``ts`` misses a live job, -1 if it still counts an ended one, else 0."""
        if self.ended_at is None:
            return 0 if self.acked_at is not None and self.acked_at <= ts else 1
        return -1 if self.acked_at is not None and self.acked_at <= ts < self.ended_at else 0


class Placement:
    """One attempt of a request on its decode and prefill instances: placed, acknowledged per role, prefill done, closed."""

    def __init__(
        self, job_id: str, decode_instance: str, prefill_instance: str, prefill_s: float, remote: bool
    ) -> None:
        now = time.time()
        self.job_id = job_id
        self.remote = remote
        self.decode = _Leg(decode_instance, now, 0.0)
        self.prefill = _Leg(prefill_instance, now, prefill_s)
        self._link: tuple[LinkBreakers, str, bool] | None = None  # a remote attempt's breakers, site, and if it probes

    def watch_link(self, breakers: LinkBreakers, site: str) -> None:
        """This remote attempt crosses ``site``'s pair: tell its breaker it started (and whether it is the probe)."""
        self._link = (breakers, site, breakers.attempt_started(site, self.decode.placed_at))

    def link_verdict(self, ok: bool | None, why: str = "") -> None:
        """What the attempt says of its link, once: its KV crossed (True), the link failed it (False), or neither."""
        if self._link is None:
            return
        breakers, site, probe = self._link
        self._link = None
        breakers.attempt_ended(site, time.time(), self.decode.placed_at, probe=probe, ok=ok, why=why)

    @property
    def where(self) -> str:
        """``remote prefill on X`` or ``local prefill on X``, as reasons and errors say it."""
        return f"{'remote' if self.remote else 'local'} prefill on {self.prefill.instance}"

    def acked(self, role: str) -> None:
        """The ``role`` ("decode" or "prefill") instance took its job: its heartbeats stamped from now include it."""
        leg = self.decode if role == "decode" else self.prefill
        leg.acked_at = leg.acked_at or time.time()

    def prefill_done(self) -> None:
        """The prefill leg is over (its status, the first token, or a failure): its instance no longer holds it."""
        self.prefill.ended_at = self.prefill.ended_at or time.time()

    def close(self) -> None:
        """The attempt is over: both instances have let it go (no verdict on the link yet: none)."""
        self.link_verdict(None)
        self.prefill_done()
        self.decode.ended_at = self.decode.ended_at or time.time()


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
        breaker: BreakerConfig | None = None,
        linkstats_silence_s: float = LINKSTATS_SILENCE_S,
    ) -> None:
        self.decode_site = decode_site
        self.linkstats_silence_s = linkstats_silence_s
        self.instance_ttl_s = instance_ttl_s
        self.pending_ttl_s = pending_ttl_s
        self.default_hardware = default_hardware
        self.links = LinkTelemetry(telemetry, link_capacities, default_link_capacity_gbps)
        self.breakers = LinkBreakers(decode_site, breaker)  # on the wall clock, as decisions are stamped
        self._loads: dict[str, tuple[InstanceLoad, float]] = {}  # instance -> (heartbeat, received at, monotonic)
        self._legs: dict[str, dict[str, _Leg]] = {}  # instance -> job id -> this router's leg there
        self._started = time.monotonic()
        self._heard = asyncio.Event()  # set by each heartbeat
        self._linkstats_at: dict[str, float] = dict.fromkeys(  # PrfaaS site -> its pair's last LinkStats (monotonic)
            (src for src, dst in (link_capacities or {}) if dst == decode_site and src != decode_site), -math.inf
        )

    # --- intake ---------------------------------------------------------------------------

    def ingest_load(self, load: InstanceLoad) -> None:
        """Take a heartbeat; legs that ended before it was stamped need no correcting any more."""
        self._loads[load.instance] = (load, time.monotonic())
        self._heard.set()
        if load.role == "prefill" and load.site != self.decode_site:
            self._linkstats_at.setdefault(load.site, -math.inf)
        self.breakers.heard(load.site, time.time())
        legs = self._legs.get(load.instance)
        if legs:
            for job_id in [j for j, leg in legs.items() if leg.ended_at is not None and leg.ended_at <= load.ts]:
                del legs[job_id]

    def ingest_link(self, stats: LinkStats, sender: str) -> None:
        """Take a LinkStats sample from one sending process."""
        self.links.ingest(stats, time.monotonic(), sender)
        if stats.dst_site == self.decode_site:
            self.breakers.heard(stats.src_site, time.time())
            self._linkstats_at[stats.src_site] = time.monotonic()

    def place(
        self, job_id: str, decode_instance: str, prefill_instance: str, prefill_s: float, remote: bool
    ) -> Placement:
        """Count an attempt on its two instances until their heartbeats show it, and after it ends until they stop."""
        placement = Placement(job_id, decode_instance, prefill_instance, prefill_s, remote)
        for leg in (placement.decode, placement.prefill):
            self._legs.setdefault(leg.instance, {})[job_id] = leg
        load = self.load_of(prefill_instance)
        if remote and load is not None:
            placement.watch_link(self.breakers, load.site)
        return placement

    def corrections(self, instance: str) -> int:
        """How many jobs this router adds to (or takes from) ``instance``'s last heartbeat."""
        load = self.load_of(instance)
        ts = load.ts if load is not None else 0.0
        return sum(leg.correction(ts) for leg in self._legs.get(instance, {}).values())

    # --- reading --------------------------------------------------------------------------

    def alive(self, model: str | None = None) -> list[InstanceLoad]:
        """Heartbeats younger than the instance TTL (of ``model`` if given)."""
        horizon = time.monotonic() - self.instance_ttl_s
        return [load for load, at in self._loads.values() if at >= horizon and (model is None or load.model == model)]

    def serving(self) -> bool:
        """True while a decode instance at this site and a prefill instance heartbeat within the instance TTL."""
        alive = self.alive()
        decode = any(load.role == "decode" and load.site == self.decode_site for load in alive)
        return decode and any(load.role == "prefill" for load in alive)

    async def until_serving(self, timeout_s: float) -> None:
        """Return once :meth:`serving` holds, or after ``timeout_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not self.serving():
                    self._heard.clear()
                    await self._heard.wait()

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

    def _corrected(self, load: InstanceLoad, now: float) -> InstanceLoad:
        """``load`` with this router's placements it misses added and those it still counts after their end taken off."""
        legs = self._legs.get(load.instance)
        if not legs:
            return load
        for job_id in [
            j
            for j, leg in legs.items()
            if now - leg.placed_at > self.pending_ttl_s and (leg.acked_at is None or leg.ended_at is not None)
        ]:
            del legs[job_id]  # never acknowledged, or ended without a later heartbeat: stop guessing
        added = [leg for leg in legs.values() if leg.correction(load.ts) > 0]
        over = [leg for leg in legs.values() if leg.correction(load.ts) < 0]
        if not added and not over:
            return load
        if load.role == "decode":
            free = min(
                load.max_batch or load.free_decode_slots + len(over), load.free_decode_slots - len(added) + len(over)
            )
            return msgspec.structs.replace(load, free_decode_slots=max(0, free))
        wait_s = load.expected_wait_s + sum(leg.prefill_s for leg in added) - sum(leg.prefill_s for leg in over)
        return msgspec.structs.replace(
            load, queue_depth=max(0, load.queue_depth + len(added) - len(over)), expected_wait_s=max(0.0, wait_s)
        )

    def cluster_view(
        self, model_name: str, profile: ModelProfile, *, exclude: Iterable[str] = (), local_only: bool = False
    ) -> ClusterView:
        """The policy's view of ``model_name``'s live instances, corrected by this router's placements.

        PrfaaS sites whose link breaker does not admit an attempt now are left out, with its note.
        """
        now = time.time()
        skip = set(exclude)
        closed = [state for state in self.breakers.states(now) if not state.admits]
        skip_sites = {state.src_site for state in closed}
        loads = [
            self._corrected(load, now)
            for load in self.alive(model_name)
            if load.instance not in skip
            and load.site not in skip_sites
            and not (local_only and load.site != self.decode_site)
        ]
        hardware_of = {ld.instance: ld.hardware if ld.hardware in HARDWARE else self.default_hardware for ld in loads}
        mono = time.monotonic()
        remote_sites = {ld.site for ld in loads if ld.role == "prefill" and ld.site != self.decode_site}
        links = [v for v in (self.links.view(site, self.decode_site, mono) for site in remote_sites) if v is not None]
        notes = [state.note() for state in closed]
        return ClusterView.from_loads(profile, self.decode_site, loads, hardware_of, links, notes)

    def link_states(self) -> list[LinkState]:
        """The breaker of every pair into this site, now."""
        return self.breakers.states(time.time())

    def kv_paths(self) -> list[KvPath]:
        """The KV path of every pair into this site (configured or heard from), now."""
        now, mono = time.time(), time.monotonic()
        out = []
        for src, heard_at in self._linkstats_at.items():
            why = self.breakers.path_down(src, now)
            silent_s = mono - max(heard_at, self._started)
            if not why and silent_s > self.linkstats_silence_s:
                heard = "no LinkStats heard" if heard_at == -math.inf else "no LinkStats"
                why = f"{heard} from {src} for {silent_s:.1f}s"
            out.append(KvPath(src, self.decode_site, why))
        return out

    def link_gbps(self, src_site: str) -> float | None:
        """The deliverable bandwidth from ``src_site`` to the decode site (None if unknown)."""
        view = self.links.view(src_site, self.decode_site, time.monotonic())
        return view.effective_gbps if view is not None else None
