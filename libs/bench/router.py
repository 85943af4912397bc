"""The router's own cost: decision latency, and TTFT through the router minus TTFT straight to the gateways.

- ``decision_1k`` / ``decision_32k``: one request's tokenize + hash + KV-index lookup (real NATS,
  Redis, and the index in its own process) + live view + policy, on a 32-instance view (8 PrfaaS
  prefill, 8 local prefill, 16 decode heartbeats), for 1K- and 32K-token prompts (targets at 32K:
  p50 <= 2 ms, p99 <= 10 ms).
- ``overhead_c1`` / ``overhead_c50``: every service in its own process as deployed (router, KV
  index, a prefill gateway with ``--prefill-instances`` simulated H200 instances, a simulated H20
  decode gateway, the reference profile). The same prompts go through the router (HTTP, streamed,
  time to the first SSE chunk) and straight to the gateways (both legs sent by a stand-in caller on
  one NATS connection, time to the first token chunk); both clients live in this process and keep
  the same number of requests in flight; rounds are interleaved. ``c1``: one client. ``c50``: 50
  clients send ``--c50-requests`` per round between them, each its next request once its last one
  finished and a random think time passed (exponential, mean 0.1 s, the same draws on both paths);
  these requests decode 16 tokens of 100 ms steps, so the gateways are busy but not saturated.
  ``p50_ms`` / ``p99_ms`` are the router's percentile minus the direct one over all rounds (target:
  ``overhead_c50.p50_ms`` <= 3), ``round_p50_ms`` the same per round (their spread is the noise of
  the machine); ``net_p50_ms`` / ``net_round_p50_ms`` the same for TTFT less the time the request
  waited where the router has no part, as the gateways report it (the prefill queue, and the decode
  batch's next step and that step: the outcome event's ``queue_s`` and ``first_step_s`` through the
  router, ``PrefillFinished`` and ``DecodeFinished`` direct), which removes most of the spread at
  concurrency 50 (a router's delay in sending the prefill leg after the reservation is counted in
  neither); and ``cpu_ms_per_request`` the CPU each process (this one is ``bench``) spent per
  request on each path (the index also ingests the gateways' KV events on both). ``decisions``
  counts the router's decisions, those re-decided, and those made without cache knowledge (the index
  failed or was late, or was not asked because nothing cached could change the route).

``--placement`` says which cores each process may run on (``os.sched_setaffinity``), the same for
both paths. ``split`` (the default) is the deployment's: the router hosts' cores (the first half of
this process's CPUs) take the router, this process (both clients, and the router of the decision
case) and nothing else; the other half takes nats-server, Redis, the KV index and the gateways.
``shared`` lets every process run on every core, so at concurrency 50 the router's CPU is taken
from the busy gateways'. Where affinity cannot be set or fewer than two CPUs are available,
``split`` falls back to ``shared`` and says why. ``placement`` in the figures names what ran and
the CPUs each child process was allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec
import nats.errors

from libs.bench.gateways import Caller, GatewayProcess, gateway_env
from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.errors import ConfigError, UpstreamTimeout
from libs.common.messages import (
    DecisionEvent,
    DecodeFinished,
    InstanceLoad,
    OutcomeEvent,
    PrefillFinished,
    Sampling,
    encode,
)
from libs.engine.tokenizer import ByteTokenizer
from libs.lab.servers import NatsServer, RedisServer, die_with_parent, free_port
from services.router.config import RouterConfig
from services.router.schemas import GenerationRequest
from services.router.service import RouterService

TARGET_32K_P50_MS, TARGET_32K_P99_MS, TARGET_C50_P50_MS = 2.0, 10.0, 3.0
SITE, REMOTE = "dc-pd", "dc-prfaas"
LABELS = ("c1", "c50")
# Concurrency 50: the decode instance's steps last 20x the reference profile's (100 ms) and each request decodes 16
# tokens, so 50 clients keep ~30 requests/s in flight, within what the gateways' core serves: a saturated gateway
# core would hide the router's time (in a closed loop, time spent in the router is time not spent queueing there).
# Each client pauses an exponential think time before each request: without it every new request would start just
# after a decode step ends (when the one it replaces finished) and wait out the next step whatever the router added.
DECODE_TIME_SCALE, C50_MAX_TOKENS, C50_THINK_S = 20.0, 16, 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--placement", choices=("split", "shared"), default="split",
                        help="split: router and clients on half the CPUs, NATS, Redis, index and gateways on the "
                             "other half; shared: every process on every CPU (default split)")  # fmt: skip
    parser.add_argument("--decisions", type=int, default=300, help="timed decisions per prompt length (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the overhead cases (default 3)")
    parser.add_argument("--requests", type=int, default=50, help="requests per round at concurrency 1 (default 50)")
    parser.add_argument("--c50-requests", type=int, default=300,
                        help="requests per round from the 50 clients at concurrency 50 (default 300)")
    parser.add_argument("--prefill-instances", type=int, default=8,
                        help="simulated prefill instances behind both paths (default 8; 1 makes concurrency 50 a 50-deep queue)")


class _Placement:
    """Which CPUs the router side (router, clients) and the services side (NATS, Redis, index, gateways) may use."""

    def __init__(self, requested: str) -> None:
        self.requested = requested
        self.name, self.note = "shared", ""
        self.front: set[int] | None = None
        self.back: set[int] | None = None
        self._original: set[int] | None = None
        if requested == "split":
            self._split()

    def _split(self) -> None:
        if not hasattr(os, "sched_setaffinity"):
            self.note = "split placement needs os.sched_setaffinity (Linux); ran shared"
            return
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            self.note = f"split placement needs two CPUs, this process may use {len(cpus)}; ran shared"
            return
        front, back = set(cpus[: len(cpus) // 2]), set(cpus[len(cpus) // 2 :])
        try:
            os.sched_setaffinity(0, back)
            os.sched_setaffinity(0, set(cpus))
        except OSError as e:
            self.note = f"cannot set CPU affinity ({e}); ran shared"
            return
        self.name, self.front, self.back = "split", front, back

    def __enter__(self) -> _Placement:
        """Move this process onto the router side's CPUs (every thread it has)."""
        if self.front is not None:
            self._original = os.sched_getaffinity(0)
            _pin_process(os.getpid(), self.front)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._original is not None:
            _pin_process(os.getpid(), self._original)

    @contextlib.contextmanager
    def services(self):
        """Within: processes started from this thread inherit the services side's CPUs."""
        if self.back is None:
            yield
            return
        os.sched_setaffinity(0, self.back)
        try:
            yield
        finally:
            os.sched_setaffinity(0, self.front)

    def describe(self) -> dict:
        """What ran, and the CPUs each process was allowed (from ``/proc``)."""
        return {"name": self.name, "requested": self.requested, "note": self.note,
                "router_side_cpus": sorted(self.front or []), "services_side_cpus": sorted(self.back or []),
                "processes": {name: _allowed_cpus(pid) for name, pid in _processes().items()}}  # fmt: skip


def _pin_process(pid: int, cpus: set[int]) -> None:
    """Set the affinity of every thread of ``pid``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def _allowed_cpus(pid: int) -> str:
    """The CPUs a process's threads may use, as ``/proc`` lists them (the union, if they differ)."""
    lists = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            status = (task / "status").read_text()
            lists.add(next((ln.split()[1] for ln in status.splitlines() if ln.startswith("Cpus_allowed_list")), "?"))
    return " | ".join(sorted(lists))


def _processes() -> dict[str, int]:
    """This process (``bench``) and its children, by module (``router``) or program (``nats-server``): pids."""
    out = {"bench": os.getpid()}
    with contextlib.suppress(OSError):
        tasks = Path("/proc/self/task").iterdir()
        for pid in sorted({int(c) for task in tasks for c in (task / "children").read_text().split()}):
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                name = argv[argv.index("-m") + 1] if "-m" in argv else Path(argv[0].split()[0]).name
                out[name.removeprefix("services.")] = pid
    return out


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _flat(rounds: list[list[float]]) -> list[float]:
    return [x for xs in rounds for x in xs]


def _figure(values_s: list[float]) -> dict:
    return {"p50_ms": _pct(values_s, 0.5) * 1000, "p99_ms": _pct(values_s, 0.99) * 1000, "n": len(values_s)}


def _loads() -> list[InstanceLoad]:
    now = time.time()
    loads = [InstanceLoad(site=REMOTE, instance=f"bp-r{i}", role="prefill", cluster="prfaas", hardware="h200", model="bench",
                          queue_depth=i % 3, expected_wait_s=0.1 * i, ts=now) for i in range(8)]  # fmt: skip
    loads += [InstanceLoad(site=SITE, instance=f"bp-l{i}", role="prefill", cluster="pd", hardware="h20", model="bench",
                           queue_depth=i % 2, expected_wait_s=0.2 * i, ts=now) for i in range(8)]  # fmt: skip
    loads += [InstanceLoad(site=SITE, instance=f"bp-d{i}", role="decode", cluster="pd", hardware="h20", model="bench",
                           free_decode_slots=4 + i, max_batch=32, ts=now) for i in range(16)]  # fmt: skip
    return loads


async def _decision_case(nats_url: str, decisions: int) -> dict:
    """Time prepare + decide of 1K and 32K-token prompts against a live index and a 32-instance view."""
    nc = await connect(nats_url, name="bench-router")
    config = RouterConfig(nats_url=nats_url, site=SITE, port=0, host="127.0.0.1", replan_interval_s=0, instance_ttl_s=600,
                          default_model_profile="kimi-linear-1t", policy="adaptive", threshold_tokens=19_392)  # fmt: skip
    router = RouterService(nc, config)
    out = {}
    try:
        await router.start()
        for load in _loads():
            await nc.publish(subjects.load(load.site, load.instance), encode(load))
        await settle(nc)
        async with asyncio.timeout(60):
            while True:
                if len(router.view.alive()) >= 32 and (await router.readiness())["index"]:
                    break
                await asyncio.sleep(0.05)
        for name, tokens in (("decision_1k", 1024), ("decision_32k", 32768)):
            times = []
            for i in range(decisions + 20):
                text = f"{i:08d} " + "x" * (tokens - 10)  # distinct prompts: no lookup is cached anywhere
                req = GenerationRequest("text", "bench", text, None, None, 16, Sampling(), False, False)
                start = time.perf_counter()
                prepared = await router.scheduler.prepare(req, f"b{i}", None)
                router.scheduler.decide(prepared)
                if prepared.index_status != "ok":
                    raise UpstreamTimeout(f"the KV index did not answer a timed lookup: {prepared.index_status}")
                if i >= 20:  # warm-up
                    times.append(time.perf_counter() - start)
            out[name] = _figure(times)
    finally:
        await router.stop()
        await nc.drain()
    return out


class _Service:
    """A service run as ``python -m services.<name>`` with env settings, stopped by its owner."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", f"services.{name}"], env={**os.environ, **env}, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)  # fmt: skip

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
    """Time to the first SSE chunk, and the request id (its outcome event says where it waited)."""
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
    task = asyncio.ensure_future(caller.request(prompt, "bo-d0", model="reference", max_tokens=max_tokens, first_token=first))
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


async def _overhead_case(nats_url: str, workdir: Path, args: argparse.Namespace, placement: _Placement) -> dict:
    """Router TTFT minus direct TTFT at concurrency 1 and 50, interleaved rounds; every service its own process."""
    port = free_port()
    router_env = {"ROUTER_NATS_URL": nats_url, "ROUTER_SITE": SITE, "ROUTER_ID": "bench-router", "ROUTER_HOST": "127.0.0.1",
                  "ROUTER_PORT": str(port), "ROUTER_POLICY": "adaptive", "ROUTER_THRESHOLD_TOKENS": "8192",
                  "ROUTER_REPLAN_INTERVAL_S": "0", "ROUTER_LOG_LEVEL": "WARNING"}  # fmt: skip
    rounds, requests = args.rounds, args.requests
    names = [f"bo-p{i}" for i in range(args.prefill_instances)]
    procs = [
        GatewayProcess("prefill_gateway", gateway_env("prefill_gateway", nats_url, site=SITE, cluster="pd", instances=",".join(names),
                       backend="simulated:h200", model="reference", queue_limit=256, heartbeat_s=0.2), workdir / "p.log"),
        GatewayProcess("decode_gateway", gateway_env("decode_gateway", nats_url, site=SITE, instance="bo-d0",
                       backend="simulated:h20", model="reference", time_scale=DECODE_TIME_SCALE, heartbeat_s=0.2),
                       workdir / "d.log"),
    ]  # fmt: skip
    nc = await connect(nats_url, name="bench-overhead")
    router = None
    tok = ByteTokenizer()
    samples = {f"{path}_{label}": [[] for _ in range(rounds)] for path in ("router", "direct") for label in LABELS}
    cpu = {f"{path}_{label}": {} for path in ("router", "direct") for label in LABELS}
    try:
        with placement.services():
            for proc in procs:
                proc.spawn()
        await asyncio.gather(procs[0].ready(nc, SITE, "bo-p0"), procs[1].ready(nc, SITE, "bo-d0"))
        router = _Service("router", router_env, workdir / "router.log")
        url = f"http://127.0.0.1:{port}"
        await router.ready_http(url + "/v1/route/explain", {"model": "reference", "prompt": "ready?"})  # both instances seen
        events = await nc.subscribe(subjects.DECISIONS_ALL)
        outcomes = await nc.subscribe(subjects.OUTCOMES_ALL)
        out = {"placement": placement.describe()}
        pids = _processes()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)) as http, \
                Caller(nc, prefill_site=SITE, cluster="pd", decode_site=SITE) as caller:  # fmt: skip
            n = 0
            for r in range(rounds):
                cases = (("c1", 1, requests, 2, 0.0), ("c50", 50, args.c50_requests, C50_MAX_TOKENS, C50_THINK_S))
                for label, clients, count, max_tokens, think_s in cases:
                    for path in ("router", "direct"):
                        prompts = [tok.encode(f"[{n + i}] overhead probe " * 16) for i in range(count)]
                        n += count

                        def call(p: list[int], path: str = path, max_tokens: int = max_tokens):
                            if path == "router":
                                return _router_ttft(http, url, p, max_tokens)
                            return _direct_ttft(caller, p, max_tokens)

                        before = {proc: _cpu_s(pid) for proc, pid in pids.items()}
                        samples[f"{path}_{label}"][r] += await _clients(call, prompts, clients, think_s, random.Random(r))
                        for proc, pid in pids.items():
                            used = cpu[f"{path}_{label}"]
                            used[proc] = used.get(proc, 0.0) + _cpu_s(pid) - before[proc]
        decisions, waited = [], {}
        with contextlib.suppress(nats.errors.TimeoutError):
            while True:
                decisions.append(msgspec.json.decode((await events.next_msg(timeout=0.5)).data, type=DecisionEvent))
        with contextlib.suppress(nats.errors.TimeoutError):
            while True:
                o = msgspec.json.decode((await outcomes.next_msg(timeout=0.5)).data, type=OutcomeEvent)
                waited[o.request_id] = _waited_s(o.queue_s, o.first_step_s)
    finally:
        if router is not None:
            router.stop()
        await nc.drain()
        for proc in procs:
            proc.stop()
    out["decisions"] = {"total": len(decisions), "retries": sum(d.attempt > 0 for d in decisions),
                         "index_unavailable": sum(d.index.startswith("unavailable") for d in decisions),
                         "index_not_asked": sum(d.index.startswith("not asked") for d in decisions)}  # fmt: skip
    unseen = [ref for per_round in samples.values() for xs in per_round for _, ref in xs if isinstance(ref, str) and ref not in waited]
    if unseen:
        raise UpstreamTimeout(f"no outcome event for {len(unseen)} requests through the router (first: {unseen[0]})")
    ttfts = {key: [[ttft for ttft, _ in xs] for xs in per_round] for key, per_round in samples.items()}
    # TTFT less the time spent in the gateways' queues, which dominates the spread at concurrency 50
    net = {key: [[ttft - (waited[ref] if isinstance(ref, str) else ref) for ttft, ref in xs] for xs in per_round]
           for key, per_round in samples.items()}  # fmt: skip
    for label in LABELS:
        per_round = [_pct(r, 0.5) - _pct(d, 0.5) for r, d in zip(ttfts[f"router_{label}"], ttfts[f"direct_{label}"], strict=True)]
        r, d = _flat(ttfts[f"router_{label}"]), _flat(ttfts[f"direct_{label}"])
        out[f"overhead_{label}"] = {
            "p50_ms": (_pct(r, 0.5) - _pct(d, 0.5)) * 1000,
            "p99_ms": (_pct(r, 0.99) - _pct(d, 0.99)) * 1000,
            "round_p50_ms": [x * 1000 for x in per_round],
            "deciles_ms": {path: [[round(sorted(xs)[int(q * (len(xs) - 1))] * 1000, 1) for q in (0, .1, .25, .5, .75, .9, 1)]
                                  for xs in ttfts[f"{path}_{label}"]] for path in ("router", "direct")},
            "net_p50_ms": (_pct(_flat(net[f"router_{label}"]), 0.5) - _pct(_flat(net[f"direct_{label}"]), 0.5)) * 1000,
            "net_round_p50_ms": [(_pct(rn, 0.5) - _pct(dn, 0.5)) * 1000
                                 for rn, dn in zip(net[f"router_{label}"], net[f"direct_{label}"], strict=True)],  # fmt: skip
            "router_ttft": _figure(r),
            "direct_ttft": _figure(d),
            # CPU of each process per request, while requests go through the router and while they go straight
            # to the gateways (the index ingests the gateways' KV events on both; heartbeats run on both)
            "cpu_ms_per_request": {path: {proc: v * 1000 / len(r) for proc, v in cpu[f"{path}_{label}"].items()}
                                   for path in ("router", "direct")},  # fmt: skip
        }
    return out


def _cpu_text(cpu: dict[str, dict[str, float]]) -> str:
    """``router 1.93/0.07, bench 0.67/0.60, ...``: each process's CPU ms per request via the router / direct."""
    return ", ".join(f"{proc} {ms:.2f}/{cpu['direct'][proc]:.2f}" for proc, ms in cpu["router"].items())


def _measure(args: argparse.Namespace, placement: _Placement, work: Path) -> dict:
    """Start NATS, Redis and the index on the services side, then run both cases."""
    with placement.services():
        nats = NatsServer(workdir=work / "nats").start()
    redis = index = None
    try:
        with placement.services():
            redis = RedisServer(workdir=work / "redis").start()
            index = _index_process(nats.url, redis.url, work)
        figures = asyncio.run(_decision_case(nats.url, args.decisions))
        return figures | asyncio.run(_overhead_case(nats.url, work, args, placement))
    finally:
        if index is not None:
            index.stop()
        if redis is not None:
            redis.stop()
        nats.stop()


def run(args: argparse.Namespace) -> int:
    """Run both cases and print the figures (JSON with ``--json``)."""
    for flag in ("decisions", "rounds", "requests", "c50_requests", "prefill_instances"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    placement = _Placement(args.placement)
    if placement.note:
        print(placement.note, file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="prfaas-bench-router-") as tmp, placement:
        figures = _measure(args, placement, Path(tmp))
    figures["decision_p50_ms"] = figures["decision_32k"]["p50_ms"]
    figures["decision_p99_ms"] = figures["decision_32k"]["p99_ms"]
    figures["targets"] = {"decision_32k_p50_ms_max": TARGET_32K_P50_MS, "decision_32k_p99_ms_max": TARGET_32K_P99_MS,
                          "overhead_c50_p50_ms_max": TARGET_C50_P50_MS}  # fmt: skip
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    p = figures["placement"]
    print(f"placement {p['name']}" + (f" ({p['note']})" if p["note"] else "") + ": "
          + ", ".join(f"{name} on CPUs {cpus}" for name, cpus in p["processes"].items()))
    for name in ("decision_1k", "decision_32k"):
        f = figures[name]
        print(f"{name}: p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms  ({f['n']} decisions)")
    counts = figures["decisions"]
    print(f"decisions through the router: {counts['total']}, re-decided {counts['retries']}; index unavailable or late "
          f"{counts['index_unavailable']}, not asked {counts['index_not_asked']}")  # fmt: skip
    for name in (f"overhead_{label}" for label in LABELS):
        f = figures[name]
        rounds = sorted(f["round_p50_ms"])
        net = sorted(f["net_round_p50_ms"])
        print(f"{name}: p50 {f['p50_ms']:+.2f} ms (rounds {rounds[0]:+.1f} .. {rounds[-1]:+.1f})  p99 {f['p99_ms']:+.2f} ms  "
              f"net of the gateways' queues p50 {f['net_p50_ms']:+.2f} ms (rounds {net[0]:+.1f} .. {net[-1]:+.1f})  "
              f"(router TTFT p50 {f['router_ttft']['p50_ms']:.2f} ms vs direct {f['direct_ttft']['p50_ms']:.2f} ms; "
              f"CPU ms per request via the router / direct: {_cpu_text(f['cpu_ms_per_request'])})")  # fmt: skip
    return 0

