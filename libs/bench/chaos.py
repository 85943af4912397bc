"""Faults under load: the default lab with two router replicas, steady traffic, one fault at a time, nothing lost.

The bench starts the default lab with a second router replica at dc-b and a second decode
instance (a killed one's requests without a token need somewhere to go), and sends a fixed rate
of requests (``chaos_load.py``: long prompts offloaded to dc-a and short ones hitting a shared prefix,
streamed and not) alternating between the two routers. Then, one at a time (``chaos_faults.py``),
each fault is injected, held, healed, and the bench waits until the system has recovered: a request
sent after the heal answered 2xx, one offloaded to dc-a and one with cached tokens. Per fault,
``faults.<name>``: ``sent``, ``completed``, ``failed_with_error`` (the client got a clear error),
``excused`` (of those, the ones the fault leaves no way around), ``unexpected_errors``, ``cut`` (streams
that ended without ``[DONE]`` or an error event: silence), ``lease_expired`` (requests retried because a decode
reservation's lease ran out: nothing noticed a dead prefill sooner), ``lost`` (no answer and no error by ``--deadline``,
by default past the router's own job deadline), ``in_flight_at_fault`` and ``slowest_in_flight_s`` (the fault
to the end of the slowest of them), ``recovery_s`` (heal to recovered), ``kv_path_down_seen``
(a router's ``prfaas_router_kv_path_up`` said 0 during the fault); the burst adds
``burst_503s`` and ``last_503_after_s`` (its end to the last 503 answered). Requests are counted in
the window of the fault they were sent in, each ended by the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from dataclasses import dataclass

import aiohttp
import msgspec

from libs.bench.case_study_deploy import running
from libs.bench.chaos_faults import CAUGHT_WAIT_S, FAULT_NAMES, FAULTS, PD_SITE, PRFAAS_SITE, Fault, Window
from libs.bench.chaos_load import CUT, Call, ChaosClient, Outcomes
from libs.bench.targets import conclude
from libs.common.bus import connect
from libs.common.errors import BadRequest
from libs.lab.faults import LabFaults
from libs.lab.topology import Topology, load_topology

_POLL_S = 0.2
_WARM_TIMEOUT_S = 90.0  # the lab serves, offloads and hits its cache before the first fault
BURST_FACTOR = 3.0
DEADLINE_S = 130.0  # the router ends a request within its job deadline (ROUTER_JOB_TIMEOUT_S, 120 s) at the latest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags."""
    parser.add_argument(
        "--faults",
        default=",".join(FAULT_NAMES),
        help=f"faults to inject, in order (default all: {','.join(FAULT_NAMES)})",
    )
    parser.add_argument("--rate", type=float, default=2.0, help="steady requests per second (default 2)")
    parser.add_argument(
        "--capacity", type=float, default=4.0, help="requests/s the lab serves; the burst sends 3x this (default 4)"
    )
    parser.add_argument("--lead", type=float, default=2.0, help="seconds of steady load before each fault (default 2)")
    parser.add_argument(
        "--recovery-window", type=float, default=30.0, help="longest wait for recovery after a heal, s (default 30)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=DEADLINE_S,
        help=f"a request with no answer and no error by then is lost (default {DEADLINE_S:g}: past the router's job "
        "deadline)",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompts (default 0)")


def chaos_topology() -> Topology:
    """The default lab with two router replicas at dc-b and two decode instances."""
    topo = load_topology("default")
    sites = []
    for site in topo.sites:
        clusters = []
        for cluster in site.clusters:
            groups = [msgspec.structs.replace(g, count=2) if g.role == "decode" else g for g in cluster.instances]
            clusters.append(msgspec.structs.replace(cluster, instances=groups))
        sites.append(msgspec.structs.replace(site, clusters=clusters))
    services = msgspec.structs.replace(topo.services, router_replicas=2)
    return msgspec.structs.replace(
        topo, name="chaos", sites=sites, services=services, source="chaos (default + replicas)"
    )


def chosen_faults(text: str) -> list[Fault]:
    """The faults named in ``--faults``, in its order (BadRequest naming an unknown one)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULT_NAMES]
    if unknown or not names or len(set(names)) < len(names):
        raise BadRequest(f"--faults: expected distinct names among {', '.join(FAULT_NAMES)}, got {text!r}")
    return [next(f for f in FAULTS if f.name == n) for n in names]


def run(args: argparse.Namespace) -> int:
    """Run the faults, print the figures with their targets; exit 1 on a miss."""
    faults = chosen_faults(args.faults)
    if min(args.rate, args.capacity, args.recovery_window, args.deadline) <= 0 or args.lead < 0:
        raise BadRequest("--rate, --capacity, --recovery-window and --deadline must be positive, --lead not negative")
    started = time.monotonic()
    doc = asyncio.run(measure(faults, args, progress))
    doc["settings"] |= {"wall_s": time.monotonic() - started}
    return conclude(args, doc, table(doc))


def progress(line: str) -> None:
    """One progress line on stderr."""
    print(f"chaos: {line}", file=sys.stderr, flush=True)


@dataclass
class _Pace:
    """What the steady sender does now: the fault whose window it is in, its rate."""

    phase: str
    rate: float
    stop: bool = False


async def _send(client: ChaosClient, pace: _Pace) -> None:
    """Send at ``pace.rate``: long and short, streamed and not, in turn."""
    i, next_at = 0, time.monotonic()
    while not pace.stop:
        client.send("long" if i % 2 == 0 else "short", (i // 2) % 2 == 0, pace.phase)
        i += 1
        next_at = max(next_at + 1.0 / pace.rate, time.monotonic() - 1.0)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def measure(faults: list[Fault], args, say=progress) -> dict:
    """Start the lab, run the faults one by one under load, settle every request; the figures."""
    topo = chaos_topology()
    async with running(topo) as lab:
        status = lab.lab.status()
        urls = list(status["router_urls"].values())
        say(f"lab up: routers {', '.join(urls)}; steady {args.rate:g} req/s")
        nc = await connect(lab.nats_url, name="chaos")
        lab_faults = LabFaults(lab.lab)
        windows: dict[str, Window] = {}
        recovery: dict[str, float] = {}
        kv_down: dict[str, bool] = {}
        try:
            outcomes = Outcomes(nc, PD_SITE)
            await outcomes.start()
            async with (
                ChaosClient(urls, topo.model, args.deadline, args.seed) as client,
                aiohttp.ClientSession() as http,
            ):
                pace = _Pace("warm-up", args.rate)
                sender = asyncio.create_task(_send(client, pace))
                try:
                    warm = await _recovered(client, outcomes, "warm-up", time.monotonic(), _WARM_TIMEOUT_S)
                    say(f"warm: serving, offloading and hitting the cache after {warm:.1f} s")
                    for fault in faults:
                        pace.phase = fault.name
                        await asyncio.sleep(args.lead)
                        w = windows[fault.name] = Window()
                        await _until_caught(client, outcomes, fault)
                        watch = asyncio.create_task(_kv_path_down(http, urls))
                        w.injected_at = time.monotonic()
                        await fault.inject(lab_faults, w)
                        say(f"{fault.name}: injected ({fault.what})")
                        if fault.burst:
                            pace.rate = BURST_FACTOR * args.capacity
                        await asyncio.sleep(fault.hold_s)
                        await fault.heal(lab_faults, w)
                        pace.rate = args.rate
                        w.healed_at = time.monotonic()
                        recovery[fault.name] = await _recovered(
                            client, outcomes, fault.name, w.healed_at, args.recovery_window
                        )
                        watch.cancel()
                        kv_down[fault.name] = await _result(watch)
                        say(
                            f"{fault.name}: healed after {w.healed_at - w.injected_at:.1f} s, recovered in {recovery[fault.name]:.1f} s"
                        )
                finally:
                    pace.stop = True
                    await asyncio.gather(sender, return_exceptions=True)
                say(f"waiting for {client.in_flight()} requests in flight (deadline {args.deadline:g} s)")
                await client.settle()
                calls = list(client.calls)
        finally:
            await nc.close()
    per_fault = {
        f.name: _figures(f, windows[f.name], calls, outcomes, recovery[f.name], kv_down[f.name]) for f in faults
    }
    return {
        "faults": per_fault,
        "lost_total": sum(c.status == "lost" for c in calls),
        "sent_total": len(calls),
        "settings": {
            "rate_rps": args.rate,
            "capacity_rps": args.capacity,
            "burst_rps": BURST_FACTOR * args.capacity,
            "lead_s": args.lead,
            "recovery_window_s": args.recovery_window,
            "deadline_s": args.deadline,
            "routers": len(urls),
            "seed": args.seed,
        },
    }


async def _result(task: asyncio.Task) -> bool:
    with contextlib.suppress(asyncio.CancelledError):
        return await task
    return task.result() if task.done() and not task.cancelled() else False


async def _kv_path_down(http: aiohttp.ClientSession, urls: list[str]) -> bool:
    """Poll the routers' ``prfaas_router_kv_path_up`` until one says 0 (True then; cancelled otherwise)."""
    down = False
    try:
        while not down:
            for url in urls:
                with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                    async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        text = await resp.text()
                    down = down or any(
                        line.startswith("prfaas_router_kv_path_up{") and line.endswith(" 0.0")
                        for line in text.splitlines()
                    )
            await asyncio.sleep(0.5)
    except asyncio.CancelledError:
        return down
    return down


async def _until_caught(client: ChaosClient, outcomes: Outcomes, fault: Fault) -> None:
    """Until a request the fault should catch runs (at most ``CAUGHT_WAIT_S``; at once when it asks for none)."""
    end = time.monotonic() + CAUGHT_WAIT_S
    while (fault.mid_stream_on or fault.mid_prefill_on) and time.monotonic() < end:
        if fault.mid_stream_on and any(
            c.stream and c.first_at is not None and c.done_at is None and outcomes.decode_of(c) == fault.mid_stream_on
            for c in client.calls[-50:]
        ):
            return
        if fault.mid_prefill_on and outcomes.prefilling_on(fault.mid_prefill_on):
            return
        await asyncio.sleep(0.02)


async def _recovered(client: ChaosClient, outcomes: Outcomes, phase: str, since: float, timeout_s: float) -> float:
    """Seconds from ``since`` until a request sent after it answered 2xx, one was offloaded and one hit (NaN: never)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        firsts = _firsts(client.calls, outcomes, phase, since)
        if all(t is not None for t in firsts):
            return max(firsts) - since
        await asyncio.sleep(_POLL_S)
    return math.nan


def _firsts(calls: list[Call], outcomes: Outcomes, phase: str, since: float) -> list[float | None]:
    """When the first 2xx answer, offloaded answer and cache hit came, among ``phase``'s calls sent after ``since``."""
    ok = offloaded = hit = None
    for call in calls:
        if call.phase != phase or call.sent_at < since or call.status != "ok":
            continue
        ok = min(ok or math.inf, call.done_at)
        outcome = outcomes.of(call)
        if outcome is not None and outcome.prefill_site == PRFAAS_SITE:
            offloaded = min(offloaded or math.inf, call.done_at)
        if outcome is not None and outcome.cached_tokens > 0:
            hit = min(hit or math.inf, call.done_at)
    return [ok, offloaded, hit]


def _figures(fault: Fault, w: Window, calls: list[Call], outcomes: Outcomes, recovery_s: float, kv_down: bool) -> dict:
    mine = [c for c in calls if c.phase == fault.name]
    failed = [c for c in mine if c.status == "error"]
    caught = [c for c in mine if c.sent_at < w.injected_at < c.done_at]  # in flight when the fault came
    excused = []
    for c in failed:
        outcome = outcomes.of(c)
        if fault.excuse is not None and fault.excuse(c, w, outcome.decode_instance if outcome else ""):
            excused.append(c)
    out = {
        "sent": len(mine),
        "completed": sum(c.status == "ok" for c in mine),
        "failed_with_error": len(failed),
        "excused": len(excused),
        "unexpected_errors": len(failed) - len(excused),
        "lost": sum(c.status == "lost" for c in mine),
        "cut": sum(c.error == CUT for c in mine),
        "lease_expired": sum(
            any("lease expired" in step for step in outcomes.trail.get(c.request_id, [])) for c in mine
        ),
        "in_flight_at_fault": len(caught),
        "slowest_in_flight_s": max((c.done_at - w.injected_at for c in caught), default=0.0),
        "recovery_s": recovery_s,
        "recovered": not math.isnan(recovery_s),
        "fault_s": w.healed_at - w.injected_at,
        "kv_path_down_seen": kv_down,
        "errors": [_explained(c, outcomes) for c in failed if c not in excused][:5],
    }
    if fault.burst:
        late = [c.done_at - w.healed_at for c in mine if c.http_status == 503 and c.done_at >= w.healed_at]
        out |= {"burst_503s": sum(c.http_status == 503 for c in mine), "last_503_after_s": max(late, default=0.0)}
    return out


def _explained(call: Call, outcomes: Outcomes) -> str:
    """A failure as the client saw it, then the router's decisions for it."""
    trail = " / ".join(outcomes.trail.get(call.request_id, []))
    return f"{call.error[:160]}" + (f" | decisions: {trail[:400]}" if trail else "")


def table(doc: dict) -> str:
    """The per-fault figures as a table."""
    head = (
        f"{'fault':<20} {'sent':>5} {'done':>5} {'error':>6} {'excused':>8} {'lost':>5} {'in_flight':>9} "
        f"{'slowest_s':>9} {'recovery_s':>11} {'kv_down':>8}"
    )
    lines = [head]
    for name, f in doc["faults"].items():
        lines.append(
            f"{name:<20} {f['sent']:>5} {f['completed']:>5} {f['failed_with_error']:>6} {f['excused']:>8} "
            f"{f['lost']:>5} {f['in_flight_at_fault']:>9} {f['slowest_in_flight_s']:>9.1f} "
            f"{f['recovery_s']:>11.1f} {'yes' if f['kv_path_down_seen'] else 'no':>8}"
        )
        lines += [f"    unexpected: {e}" for e in f["errors"]]
    return "\n".join(lines)
