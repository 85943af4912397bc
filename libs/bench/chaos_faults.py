"""The chaos run's faults: what each one does to the lab, how long it lasts, how it heals, which failures it excuses.

Each fault is injected once, held ``hold_s`` (the bench scales holds that are waits, not the
fault's definition), then healed: a killed process is started again (as an orchestrator would),
a stopped one continued, the link restored. A request may fail with a clear error only where the
fault leaves no other way: a stream already running on the killed decode instance (its tokens
cannot be replayed), or a request in flight on the killed router (its connection died with it);
during the overload burst a 503 is the answer asked for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from libs.bench.chaos_load import Call
from libs.lab.faults import LabFaults

PRFAAS_SITE, PD_SITE = "dc-a", "dc-b"
CAUGHT_WAIT_S = 10.0


@dataclass
class Window:
    """When a fault was injected and healed (``time.monotonic()``), and what it hit."""

    injected_at: float = 0.0
    healed_at: float = 0.0
    target: str = ""  # the process it hit ("" for the link and the burst)
    target_url: str = ""  # a killed router's URL


Step = Callable[[LabFaults, Window], Awaitable[None]]
Excuse = Callable[[Call, Window, str], bool]  # (call, window, the outcome's decode instance) -> failure excused


@dataclass(frozen=True)
class Fault:
    """One fault of the run."""

    name: str
    what: str  # the README's words for it
    inject: Step
    heal: Step
    hold_s: float
    excuse: Excuse | None = None
    burst: bool = False  # the overload burst: the bench sends at 3x capacity while it holds
    mid_stream_on: str = ""  # inject once a stream runs on this decode instance (at most CAUGHT_WAIT_S) ...
    mid_prefill_on: str = ""  # ... or once a request waits for its first token from this prefill instance


def _kill(role: str, site: str | None, index: int = 0) -> Step:
    async def step(faults: LabFaults, w: Window) -> None:
        w.target = faults.names(role, site)[index]
        if role == "router":
            w.target_url = faults.lab.status()["router_urls"][w.target]
        faults.kill(w.target)

    return step


async def _restart_target(faults: LabFaults, w: Window) -> None:
    await faults.restart(w.target)


def _restart(name: str) -> Step:
    async def step(faults: LabFaults, w: Window) -> None:
        w.target = name
        await faults.restart(name)

    return step


async def _nothing(faults: LabFaults, w: Window) -> None:
    return None


async def _stop_prefill(faults: LabFaults, w: Window) -> None:
    w.target = faults.names("prefill_gateway", PRFAAS_SITE)[0]
    faults.pause(w.target)


async def _continue(faults: LabFaults, w: Window) -> None:
    faults.resume(w.target)


def _link(changes: dict) -> Step:
    async def step(faults: LabFaults, w: Window) -> None:
        await faults.link(changes)

    return step


def _streams_on_killed_decode(call: Call, w: Window, decode_instance: str) -> bool:
    """A stream that had its first token before the kill, on the killed instance (if the outcome says), ended by an
    error event (not cut short)."""
    running = call.stream and call.first_at is not None and call.first_at < w.injected_at <= (call.done_at or 0)
    on_killed = decode_instance in ("", w.target.removeprefix("decode-"))
    return running and on_killed and call.error.startswith("error event")


def _in_flight_on_killed_router(call: Call, w: Window, decode_instance: str) -> bool:
    """A request the killed router had taken and not answered when it died."""
    return call.router == w.target_url and call.sent_at < w.injected_at <= (call.done_at or 0)


def _burst_503(call: Call, w: Window, decode_instance: str) -> bool:
    """A 503 (no capacity) answered to the burst; the bench times how long 503s go on after it."""
    return call.http_status == 503


FAULTS: tuple[Fault, ...] = (
    Fault(
        "prefill_kill_dc-a",
        "kill -9 of the PrfaaS prefill gateway at dc-a, restarted after the hold",
        _kill("prefill_gateway", PRFAAS_SITE),
        _restart_target,
        5.0,
        mid_prefill_on="prfaas-p0",
    ),
    Fault(
        "prefill_kill_dc-b",
        "kill -9 of the PD prefill gateway at dc-b, restarted after the hold",
        _kill("prefill_gateway", PD_SITE),
        _restart_target,
        5.0,
        mid_prefill_on="pd-p0",
    ),
    Fault(
        "decode_kill",
        "kill -9 of one of the two decode gateways, restarted after the hold",
        _kill("decode_gateway", PD_SITE),
        _restart_target,
        5.0,
        _streams_on_killed_decode,
        mid_stream_on="pd-d0",
    ),
    Fault(
        "kv_index_kill", "kill -9 of kv_index, restarted after the hold", _kill("kv_index", None), _restart_target, 5.0
    ),
    Fault("redis_restart", "Redis restarted (empty: the lab saves nothing)", _restart("redis"), _nothing, 0.0),
    Fault("nats_restart_dc-a", "dc-a's nats-server restarted (SIGTERM, start)", _restart("nats-dc-a"), _nothing, 0.0),
    Fault(
        "nats_restart_dc-b",
        "dc-b's nats-server restarted (the routers', decode's and kv_index's)",
        _restart("nats-dc-b"),
        _nothing,
        0.0,
    ),
    Fault(
        "partition", "the dc-a <-> dc-b link cut (blackhole) for 10 s", _link({"up": False}), _link({"up": True}), 10.0
    ),
    Fault(
        "router_kill",
        "kill -9 of one of the two router replicas at dc-b, restarted after the hold",
        _kill("router", PD_SITE),
        _restart_target,
        5.0,
        _in_flight_on_killed_router,
    ),
    Fault(
        "link_loss", "1% segment loss on the link for 15 s", _link({"loss_pct": 1.0}), _link({"loss_pct": 0.0}), 15.0
    ),
    Fault(
        "prefill_stop",
        "SIGSTOP of the dc-a prefill gateway for 15 s (hung, not dead), then SIGCONT",
        _stop_prefill,
        _continue,
        15.0,
        mid_prefill_on="prfaas-p0",
    ),
    Fault(
        "overload", "a burst at 3x capacity for 5 s, then the steady rate", _nothing, _nothing, 5.0, _burst_503, True
    ),
)
FAULT_NAMES = tuple(f.name for f in FAULTS)
