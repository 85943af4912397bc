"""The router's own cost: decision latency against its floor, and TTFT through the router minus straight to the gateways.

- ``decision_1k`` / ``decision_32k`` (``libs/bench/router_decision.py``): one request's tokenize
  (a ``tokenizer.json``) + hash + KV-index lookup (real NATS, Redis, the index in its own process,
  the prompt's prefix held there) + live view + policy on a 32-instance view; ``vs_floor`` is its
  median over the median of the lookup alone on the same hashes, timed in the same run (target at
  32K: <= 1.5; p50 <= 2 ms and p99 <= 10 ms are shown for information).
- ``overhead_<case>``: every service in its own process as deployed (router, KV index, a local
  prefill gateway with ``--prefill-instances`` simulated H200 instances, a PrfaaS prefill gateway
  at the other site with one, a simulated H20 decode gateway reached from the other site through
  the WAN link relay, the reference profile, t = 1,024 tokens). The same prompts go through the
  router (HTTP, streamed, time to the first SSE chunk) and straight to the gateways (both legs sent
  by a stand-in caller on one NATS connection, time to the first token chunk); both clients live in
  this process and keep the same number of requests in flight; rounds are interleaved. Cases:
  ``c1``: one client, ~330-token prompts (under t: local, the index not asked). ``c50``: 50 clients
  send ``--c50-requests`` per round between them, each its next request once its last one finished
  and a random think time passed (exponential, mean 0.1 s, the same draws on both paths); these
  requests decode 16 tokens of 100 ms steps, so the gateways are busy but not saturated.
  ``remote``: one client, ~1,500-token prompts with nothing cached (over t: the index asked, prefill
  at the PrfaaS site, the KV across the relay). ``hit``: one client, a 1,024-token prefix every
  prompt shares (cached at the PrfaaS instance and the decode instance by an untimed request on
  each path at the start of each round's case: the remote case's KV evicts it) and ~1,100 tokens
  of their own (the index asked and hit, prefill of the rest remotely, only the rest's KV sent).
  ``p50_ms`` / ``p99_ms`` are the router's percentile minus the direct one
  over all rounds (target <= 3 ms at ``c50``, ``remote`` and ``hit``), ``round_p50_ms`` the same per
  round (their spread is the noise of the machine); ``net_p50_ms`` / ``net_round_p50_ms`` the same
  for TTFT less the time the request waited where the router has no part, as the gateways report it
  (the prefill queue, and the decode batch's next step and that step: the outcome event's
  ``queue_s`` and ``first_step_s`` through the router, ``PrefillFinished`` and ``DecodeFinished``
  direct), which removes most of the spread at concurrency 50; and ``cpu_ms_per_request`` the CPU
  each process (this one is ``bench``) spent per request on each path. ``decisions`` counts the
  router's decisions, those re-decided, those that asked the index (and those it failed or was
  late for, or did not ask), and per case the requests routed remotely and, of those the index
  answered in time, the ones that reused a cached prefix (``remote_share`` of ``remote`` and
  ``hit``, ``hit_share`` of ``hit``: both must be 1). The router waits for the index no longer than
  a hit could save (5 ms here), so on a loaded machine some lookups are late; they are counted.

``--placement`` (``libs/bench/placement.py``) says which cores each process may run on, the same
for both paths: ``split`` (the default) puts the router and this process on one half of the CPUs
and everything else on the other; ``shared`` lets every process run on every core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec

from libs.bench.gateways import Caller, GatewayProcess, gateway_env
from libs.bench.placement import Placement, processes
from libs.bench.router_decision import decision_case
from libs.bench.targets import conclude
from libs.bench.wan import LinkRelay
from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.errors import ConfigError, UpstreamTimeout
from libs.common.hashing import hash_list
from libs.common.messages import DecisionEvent, DecodeFinished, OutcomeEvent, PrefillFinished
from libs.engine.tokenizer import ByteTokenizer
from libs.lab.servers import NatsServer, RedisServer, die_with_parent, free_port
from services.kv_index.client import KvIndexClient

SITE, REMOTE = "dc-pd", "dc-prfaas"
THRESHOLD_TOKENS = 1024
LABELS = ("c1", "c50", "remote", "hit")
LINK_GBPS = 10.0  # the relay's bandwidth and the PrfaaS gateway's budget towards the decode site
# Concurrency 50: the decode instance's steps last 20x the reference profile's (100 ms) and each request decodes 16
# tokens, so 50 clients keep ~30 requests/s in flight, within what the gateways' core serves: a saturated gateway
# core would hide the router's time (in a closed loop, time spent in the router is time not spent queueing there).
# Each client pauses an exponential think time before each request: without it every new request would start just
# after a decode step ends (when the one it replaces finished) and wait out the next step whatever the router added.
DECODE_TIME_SCALE, C50_MAX_TOKENS, C50_THINK_S = 20.0, 16, 0.1
_TOK = ByteTokenizer()
_SHARED = _TOK.encode("[shared] A system prompt every hit request starts with. " * 20, bos=True)[:THRESHOLD_TOKENS]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument(
        "--placement",
        choices=("split", "shared"),
        default="split",
        help="split: router and clients on half the CPUs, NATS, Redis, index, gateways and relay on the "
        "other half; shared: every process on every CPU (default split)",
    )
    parser.add_argument("--decisions", type=int, default=300, help="timed decisions per prompt length (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the overhead cases (default 3)")
    parser.add_argument(
        "--requests",
        type=int,
        default=50,
        help="requests per round of each concurrency-1 case: c1, remote, hit (default 50)",
    )
    parser.add_argument(
        "--c50-requests",
        type=int,
        default=300,
        help="requests per round from the 50 clients at concurrency 50 (default 300)",
    )
    parser.add_argument(
        "--prefill-instances",
        type=int,
        default=8,
        help="simulated local prefill instances behind both paths (default 8; 1 makes concurrency 50 a 50-deep queue)",
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _flat(rounds: list[list[float]]) -> list[float]:
    return [x for xs in rounds for x in xs]


def _figure(values_s: list[float]) -> dict:
    return {"p50_ms": _pct(values_s, 0.5) * 1000, "p99_ms": _pct(values_s, 0.99) * 1000, "n": len(values_s)}


def _prompt(label: str, n: int) -> list[int]:
    """Request ``n``'s prompt of a case (byte tokens; distinct from the first block unless it is a hit)."""
    if label == "remote":
        return _TOK.encode(f"[{n}] a long prompt, over the threshold, with nothing cached anywhere " * 22, bos=True)[
            :1536
        ]
    if label == "hit":
        return _SHARED + _TOK.encode(f" [{n}] and a question of its own, long enough to be offloaded " * 20)[:1100]
    return _TOK.encode(f"[{n}] overhead probe " * 16)


class _Service:
    """A service run as ``python -m services.<name>`` with env settings, stopped by its owner."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}"],
                env={**os.environ, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None,
            )

    async def ready_http(self, url: str, body: dict, timeout_s: float = 60.0) -> None:
        """Wait until a POST of ``body`` to ``url`` answers 200 (the process must stay alive meanwhile)."""
        end = time.monotonic() + timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as http:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise UpstreamTimeout(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with http.post(url, json=body) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise UpstreamTimeout(f"{self.name} not ready at {url} within {timeout_s:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _index_process(nats_url: str, redis_url: str, workdir: Path) -> _Service:
    env = {"KV_INDEX_NATS_URL": nats_url, "KV_INDEX_REDIS_URL": redis_url, "KV_INDEX_LOG_LEVEL": "WARNING"}
    return _Service("kv_index", env, workdir / "kv_index.log")


async def _router_ttft(http: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> tuple[float, str]:
    """Time to the first SSE chunk, and the request id (its events say where it went and where it waited)."""
    body = {"model": "reference", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.perf_counter()
    async with http.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise ConfigError(f"router answered {r.status}: {await r.text()}")
        await r.content.readline()
        ttft = time.perf_counter() - start
        await r.read()
    return ttft, r.headers["x-prfaas-request-id"]


async def _direct_ttft(caller: Caller, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """Time to the first token chunk, and the time it waited in the gateways' queues (as they report it)."""
    first = asyncio.Event()
    start = time.perf_counter()
    task = asyncio.ensure_future(
        caller.request(prompt, "bo-d0", model="reference", max_tokens=max_tokens, first_token=first)
    )
    try:
        async with asyncio.timeout(60):
            await first.wait()
    finally:
        ttft = time.perf_counter() - start
        outcome = await task
    if not isinstance(outcome.status, PrefillFinished) or not isinstance(outcome.final, DecodeFinished):
        raise ConfigError(f"direct request {outcome.request_id} failed: {outcome.status} / {outcome.final}")
    return ttft, _waited_s(outcome.status.queue_s, outcome.final.timings.first_step_s)


def _waited_s(prefill_queue_s: float | None, first_step_s: float | None) -> float:
    """Time a request spent where the router has no part: the prefill queue and the decode batch's first step."""
    return (prefill_queue_s or 0.0) + (first_step_s or 0.0)


async def _clients(call, prompts: list[list[int]], clients: int, think_s: float, rng: random.Random) -> list[tuple]:
    """``call`` of every prompt, sent by ``clients`` concurrent clients, each pausing an exponential think time first."""
    pending, results = iter(prompts), []

    async def client() -> None:
        for prompt in pending:
            if think_s:
                await asyncio.sleep(rng.expovariate(1 / think_s))
            results.append(await call(prompt))

    await asyncio.gather(*(client() for _ in range(clients)))
    return results


class _Events:
    """The router's decision and outcome events, by request id."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.decisions: dict[str, list[DecisionEvent]] = {}
        self.outcomes: dict[str, OutcomeEvent] = {}
        self._changed = asyncio.Event()

    async def start(self) -> None:
        """Subscribe to both subjects (settled: nothing published after this is missed)."""

        async def on_decision(msg) -> None:
            event = msgspec.json.decode(msg.data, type=DecisionEvent)
            self.decisions.setdefault(event.request_id, []).append(event)

        async def on_outcome(msg) -> None:
            event = msgspec.json.decode(msg.data, type=OutcomeEvent)
            self.outcomes[event.request_id] = event
            self._changed.set()

        await self.nc.subscribe(subjects.DECISIONS_ALL, cb=on_decision)
        await self.nc.subscribe(subjects.OUTCOMES_ALL, cb=on_outcome)
        await settle(self.nc)

    async def wait_for(self, request_ids: set[str], timeout_s: float = 10.0) -> None:
        """Until every request's outcome (published after its decisions) arrived."""
        try:
            async with asyncio.timeout(timeout_s):
                while request_ids - self.outcomes.keys():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            missing = request_ids - self.outcomes.keys()
            raise UpstreamTimeout(f"no outcome event for {len(missing)} requests through the router") from None


async def _until_indexed(nc, hashes: list[int], instance: str, timeout_s: float = 30.0) -> None:
    """Wait until the KV index says ``instance`` holds every block of ``hashes`` (its KV events ingested)."""
    client = KvIndexClient(nc, timeout_s=5.0)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        reply = await client.lookup(hashes)
        if any(p.instance == instance and p.attn_kv_blocks == len(hashes) for p in reply.instances):
            return
        await asyncio.sleep(0.05)
    raise UpstreamTimeout(f"the index did not show the shared prefix on {instance} within {timeout_s:.0f}s")


async def _warm_shared_prefix(http: aiohttp.ClientSession, url: str, caller: Caller, nc, r: int) -> None:
    """One untimed hit-case request on each path: the prefill and decode instances' caches hold the shared prefix
    again, whichever path comes first, and the index says so."""
    await _router_ttft(http, url, _prompt("hit", -2 * r - 1), 2)
    await _direct_ttft(caller, _prompt("hit", -2 * r - 2), 2)
    await _until_indexed(nc, hash_list(_SHARED, 64), "bo-r0")


def _gateway_procs(nats_url: str, workdir: Path, args: argparse.Namespace, decode_port: int, relay_port: int) -> list:
    """The local prefill gateway, the PrfaaS one at the other site, and the decode gateway (reached through the relay)."""
    names = ",".join(f"bo-p{i}" for i in range(args.prefill_instances))
    common = {"backend": "simulated:h200", "model": "reference", "queue_limit": 256, "heartbeat_s": 0.2}
    return [
        GatewayProcess(
            "prefill_gateway",
            gateway_env("prefill_gateway", nats_url, site=SITE, cluster="pd", instances=names, **common),
            workdir / "p.log",
        ),
        GatewayProcess(
            "prefill_gateway",
            gateway_env(
                "prefill_gateway",
                nats_url,
                site=REMOTE,
                cluster="prfaas",
                instances="bo-r0",
                budgets=f"{SITE}={LINK_GBPS}",
                **common,
            ),
            workdir / "r.log",
        ),
        GatewayProcess(
            "decode_gateway",
            gateway_env(
                "decode_gateway",
                nats_url,
                site=SITE,
                instance="bo-d0",
                backend="simulated:h20",
                model="reference",
                time_scale=DECODE_TIME_SCALE,
                heartbeat_s=0.2,
                tcp_port=decode_port,
                advertise_by_site=f"{REMOTE}=127.0.0.1:{relay_port}",
            ),
            workdir / "d.log",
        ),
    ]


async def _overhead_case(
    nats_url: str, workdir: Path, args: argparse.Namespace, placement: Placement, decode_port: int, relay_port: int
) -> dict:
    """Router TTFT minus direct TTFT in every case, interleaved rounds; every service its own process."""
    port = free_port()
    router_env = {
        "ROUTER_NATS_URL": nats_url,
        "ROUTER_SITE": SITE,
        "ROUTER_ID": "bench-router",
        "ROUTER_HOST": "127.0.0.1",
        "ROUTER_PORT": str(port),
        "ROUTER_POLICY": "adaptive",
        "ROUTER_THRESHOLD_TOKENS": str(THRESHOLD_TOKENS),
        "ROUTER_REPLAN_INTERVAL_S": "0",
        "ROUTER_LOG_LEVEL": "WARNING",
    }
    rounds = args.rounds
    procs = _gateway_procs(nats_url, workdir, args, decode_port, relay_port)
    nc = await connect(nats_url, name="bench-overhead")
    router = None
    samples = {f"{path}_{label}": [[] for _ in range(rounds)] for path in ("router", "direct") for label in LABELS}
    cpu = {f"{path}_{label}": {} for path in ("router", "direct") for label in LABELS}
    events = _Events(nc)
    try:
        with placement.services():
            for proc in procs:
                proc.spawn()
        await asyncio.gather(
            procs[0].ready(nc, SITE, "bo-p0"), procs[1].ready(nc, REMOTE, "bo-r0"), procs[2].ready(nc, SITE, "bo-d0")
        )
        router = _Service("router", router_env, workdir / "router.log")
        url = f"http://127.0.0.1:{port}"
        await router.ready_http(url + "/v1/route/explain", {"model": "reference", "prompt": "ready?"})  # instances seen
        await events.start()
        out = {"placement": placement.describe()}
        pids = processes()
        async with (
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)
            ) as http,
            Caller(nc, prefill_site=SITE, cluster="pd", decode_site=SITE) as local,
            Caller(nc, prefill_site=REMOTE, cluster="prfaas", decode_site=SITE) as remote,
        ):
            await remote.reachable(nc)
            n = 0
            for r in range(rounds):
                cases = (
                    ("c1", 1, args.requests, 2, 0.0, local),
                    ("c50", 50, args.c50_requests, C50_MAX_TOKENS, C50_THINK_S, local),
                    ("remote", 1, args.requests, 2, 0.0, remote),
                    ("hit", 1, args.requests, 2, 0.0, remote),
                )
                for label, clients, count, max_tokens, think_s, caller in cases:
                    if label == "hit":  # the remote case's KV has evicted the shared prefix since the last round
                        await _warm_shared_prefix(http, url, remote, nc, r)
                    for path in ("router", "direct"):
                        prompts = [_prompt(label, n + i) for i in range(count)]
                        n += count

                        def call(p: list[int], path: str = path, max_tokens: int = max_tokens, caller: Caller = caller):
                            if path == "router":
                                return _router_ttft(http, url, p, max_tokens)
                            return _direct_ttft(caller, p, max_tokens)

                        before = {proc: _cpu_s(pid) for proc, pid in pids.items()}
                        samples[f"{path}_{label}"][r] += await _clients(
                            call, prompts, clients, think_s, random.Random(r)
                        )
                        for proc, pid in pids.items():
                            used = cpu[f"{path}_{label}"]
                            used[proc] = used.get(proc, 0.0) + _cpu_s(pid) - before[proc]
        routed = {ref for label in LABELS for xs in samples[f"router_{label}"] for _, ref in xs}
        await events.wait_for(routed)
    finally:
        if router is not None:
            router.stop()
        await nc.drain()
        for proc in procs:
            proc.stop()
    out["decisions"] = _decision_counts(events, samples)
    out |= _overheads(samples, events, cpu)
    return out


def _decision_counts(events: _Events, samples: dict) -> dict:
    """The router's decisions: retries, how often it asked the index, and per case where it routed and what it reused."""
    decisions = [d for ds in events.decisions.values() for d in ds]
    first = {rid: min(ds, key=lambda d: d.attempt) for rid, ds in events.decisions.items()}
    by_case = {}
    for label in LABELS:
        ids = [ref for xs in samples[f"router_{label}"] for _, ref in xs]
        ds = [first[rid] for rid in ids]
        answered = [d for d in ds if d.index == "ok"]
        by_case[label] = {
            "requests": len(ids),
            "index_asked": sum(not d.index.startswith("not asked") for d in ds),
            "index_answered": len(answered),
            "remote": sum(d.route == "remote" for d in ds),
            "reused_prefix": sum(d.decision.reused_prefix_tokens > 0 for d in answered),
        }
    return {
        "total": len(decisions),
        "retries": sum(d.attempt > 0 for d in decisions),
        "index_asked": sum(not d.index.startswith("not asked") for d in decisions),
        "index_unavailable": sum(d.index.startswith("unavailable") for d in decisions),
        "index_not_asked": sum(d.index.startswith("not asked") for d in decisions),
        "by_case": by_case,
    }


def _overheads(samples: dict, events: _Events, cpu: dict) -> dict:
    """Per case: router minus direct TTFT percentiles, per round, net of the gateways' queues; CPU per request."""
    waited = {rid: _waited_s(o.queue_s, o.first_step_s) for rid, o in events.outcomes.items()}
    ttfts = {key: [[ttft for ttft, _ in xs] for xs in per_round] for key, per_round in samples.items()}
    # TTFT less the time spent in the gateways' queues, which dominates the spread at concurrency 50
    net = {
        key: [[ttft - (waited[ref] if isinstance(ref, str) else ref) for ttft, ref in xs] for xs in per_round]
        for key, per_round in samples.items()
    }
    out = {}
    for label in LABELS:
        per_round = [
            _pct(r, 0.5) - _pct(d, 0.5) for r, d in zip(ttfts[f"router_{label}"], ttfts[f"direct_{label}"], strict=True)
        ]
        r, d = _flat(ttfts[f"router_{label}"]), _flat(ttfts[f"direct_{label}"])
        out[f"overhead_{label}"] = {
            "p50_ms": (_pct(r, 0.5) - _pct(d, 0.5)) * 1000,
            "p99_ms": (_pct(r, 0.99) - _pct(d, 0.99)) * 1000,
            "round_p50_ms": [x * 1000 for x in per_round],
            "deciles_ms": {
                path: [
                    [round(sorted(xs)[int(q * (len(xs) - 1))] * 1000, 1) for q in (0, 0.1, 0.25, 0.5, 0.75, 0.9, 1)]
                    for xs in ttfts[f"{path}_{label}"]
                ]
                for path in ("router", "direct")
            },
            "net_p50_ms": (_pct(_flat(net[f"router_{label}"]), 0.5) - _pct(_flat(net[f"direct_{label}"]), 0.5)) * 1000,
            "net_round_p50_ms": [
                (_pct(rn, 0.5) - _pct(dn, 0.5)) * 1000
                for rn, dn in zip(net[f"router_{label}"], net[f"direct_{label}"], strict=True)
            ],
            "router_ttft": _figure(r),
            "direct_ttft": _figure(d),
            # CPU of each process per request, while requests go through the router and while they go straight
            # to the gateways (the index ingests the gateways' KV events on both; heartbeats run on both)
            "cpu_ms_per_request": {
                path: {proc: v * 1000 / len(r) for proc, v in cpu[f"{path}_{label}"].items()}
                for path in ("router", "direct")
            },
        }
    return out


def _cpu_text(cpu: dict[str, dict[str, float]]) -> str:
    """``router 1.93/0.07, bench 0.67/0.60, ...``: each process's CPU ms per request via the router / direct."""
    return ", ".join(f"{proc} {ms:.2f}/{cpu['direct'][proc]:.2f}" for proc, ms in cpu["router"].items())


def _measure(args: argparse.Namespace, placement: Placement, work: Path) -> dict:
    """Start NATS, Redis, the index and the link relay on the services side, then run both cases."""
    decode_port = free_port()
    with placement.services():
        nats = NatsServer(workdir=work / "nats").start()
    redis = index = None
    try:
        with placement.services():
            redis = RedisServer(workdir=work / "redis").start()
            index = _index_process(nats.url, redis.url, work)
        figures = asyncio.run(decision_case(nats.url, redis.url, work, args.decisions))
        with contextlib.ExitStack() as stack:
            with placement.services():  # the relay process runs beside the gateways
                relay = stack.enter_context(LinkRelay(decode_port, gbps=LINK_GBPS, rtt_ms=0.0))
            return figures | asyncio.run(_overhead_case(nats.url, work, args, placement, decode_port, relay.port))
    finally:
        if index is not None:
            index.stop()
        if redis is not None:
            redis.stop()
        nats.stop()


def _text(figures: dict) -> str:
    """The figures for people (the verdicts follow)."""
    p = figures["placement"]
    rows = [
        f"placement {p['name']}"
        + (f" ({p['note']})" if p["note"] else "")
        + ": "
        + ", ".join(f"{name} on CPUs {cpus}" for name, cpus in p["processes"].items())
    ]
    for name in ("decision_1k", "decision_32k"):
        f = figures[name]
        floor, cold = f["floor"], f["cold"]
        rows.append(
            f"{name} ({f['prompt_tokens']} tokens, {f['held_blocks']} blocks held, index late {f['index_late']}): "
            f"p50 {f['p50_ms']:.2f} ms  "
            f"p99 {f['p99_ms']:.2f} ms  ({f['n']} decisions) = {f['vs_floor']:.2f}x the lookup alone "
            f"(p50 {floor['lookup_nats']['p50_ms']:.2f} ms over NATS, Lua walk {floor['lua_walk']['p50_ms']:.2f} ms); "
            f"cold (a prompt the router has not seen) p50 {cold['p50_ms']:.2f} ms  p99 {cold['p99_ms']:.2f} ms = "
            f"{cold['vs_floor']:.2f}x, index late {cold['index_late']}; "
            f"tokenizing alone p50 {f['tokenize']['p50_ms']:.2f} ms"
        )
    counts = figures["decisions"]
    rows.append(
        f"decisions through the router: {counts['total']}, re-decided {counts['retries']}; asked the index "
        f"{counts['index_asked']} (unavailable or late {counts['index_unavailable']}), not asked "
        f"{counts['index_not_asked']}; per case (requests, asked, answered in time, remote, reused a prefix): "
        + ", ".join(
            f"{k} {c['requests']}/{c['index_asked']}/{c['index_answered']}/{c['remote']}/{c['reused_prefix']}"
            for k, c in counts["by_case"].items()
        )
    )
    for label in LABELS:
        f = figures[f"overhead_{label}"]
        rounds, net = sorted(f["round_p50_ms"]), sorted(f["net_round_p50_ms"])
        rows.append(
            f"overhead_{label}: p50 {f['p50_ms']:+.2f} ms (rounds {rounds[0]:+.1f} .. {rounds[-1]:+.1f})  "
            f"p99 {f['p99_ms']:+.2f} ms  net of the gateways' queues p50 {f['net_p50_ms']:+.2f} ms (rounds "
            f"{net[0]:+.1f} .. {net[-1]:+.1f})  (router TTFT p50 {f['router_ttft']['p50_ms']:.2f} ms vs direct "
            f"{f['direct_ttft']['p50_ms']:.2f} ms; CPU ms per request via the router / direct: "
            f"{_cpu_text(f['cpu_ms_per_request'])})"
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    """Run both cases and print the figures with their verdicts (JSON with ``--json``); exit 1 on a miss."""
    for flag in ("decisions", "rounds", "requests", "c50_requests", "prefill_instances"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    placement = Placement(args.placement)
    if placement.note:
        print(placement.note, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="prfaas-bench-router-") as tmp, placement:
        figures = _measure(args, placement, Path(tmp))
    cases = figures["decisions"]["by_case"]
    for label in ("remote", "hit"):
        figures[f"overhead_{label}"]["remote_share"] = cases[label]["remote"] / cases[label]["requests"]
    # where the index answered in time, every hit request must have used the prefix it held
    figures["overhead_hit"]["hit_share"] = cases["hit"]["reused_prefix"] / max(cases["hit"]["index_answered"], 1)
    return conclude(args, figures, _text(figures))
