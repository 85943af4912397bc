"""The router's own cost: decision latency, and TTFT through the router minus TTFT straight to the gateways.

- ``decision_1k`` / ``decision_32k``: one request's tokenize + hash + KV-index lookup (real NATS,
  index and Redis) + live view + policy, on a 32-instance view (8 PrfaaS prefill, 8 local prefill,
  16 decode heartbeats), for 1K- and 32K-token prompts (targets at 32K: p50 <= 2 ms, p99 <= 10 ms).
- ``overhead_c1`` / ``overhead_c50``: simulated gateways (``simulated:h200`` prefill, ``simulated:h20``
  decode, the reference profile) at one site; the same prompts are sent through the router
  (HTTP, streamed, time to the first SSE chunk) and straight to the gateways (both legs sent by a
  stand-in caller, time to the first token chunk), rounds interleaved, at 1 and 50 concurrent
  requests. ``p50_ms`` / ``p99_ms`` are the router's percentile minus the direct one (target:
  ``overhead_c50.p50_ms`` <= 3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import aiohttp

from libs.bench.gateways import Caller, GatewayProcess, gateway_env
from libs.common import subjects
from libs.common.bus import connect
from libs.common.errors import ConfigError
from libs.common.messages import InstanceLoad, Sampling, encode
from libs.engine.tokenizer import ByteTokenizer
from libs.lab.servers import NatsServer, RedisServer
from services.kv_index.config import KvIndexConfig
from services.kv_index.service import KvIndexService
from services.router.config import RouterConfig
from services.router.schemas import GenerationRequest
from services.router.service import RouterService

TARGET_32K_P50_MS, TARGET_32K_P99_MS, TARGET_C50_P50_MS = 2.0, 10.0, 3.0
SITE, REMOTE = "dc-pd", "dc-prfaas"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--decisions", type=int, default=300, help="timed decisions per prompt length (default 300)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the overhead cases (default 3)")
    parser.add_argument("--requests", type=int, default=50, help="requests per round at concurrency 1 (default 50)")


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


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


async def _decision_case(nats_url: str, redis_url: str, decisions: int) -> dict:
    """Time prepare + decide of 1K and 32K-token prompts against a live index and a 32-instance view."""
    nc = await connect(nats_url, name="bench-router")
    index = KvIndexService(nc, _redis(redis_url), KvIndexConfig(nats_url=nats_url, redis_url=redis_url))
    config = RouterConfig(nats_url=nats_url, site=SITE, port=0, host="127.0.0.1", replan_interval_s=0, instance_ttl_s=600,
                          default_model_profile="kimi-linear-1t", policy="adaptive", threshold_tokens=19_392)  # fmt: skip
    router = RouterService(nc, config)
    out = {}
    try:
        await index.start()
        await router.start()
        for load in _loads():
            await nc.publish(subjects.load(load.site, load.instance), encode(load))
        await nc.flush()
        while True:
            if len(router.view.alive()) >= 32:
                break
            await asyncio.sleep(0.01)
        for name, tokens in (("decision_1k", 1024), ("decision_32k", 32768)):
            times = []
            for i in range(decisions + 20):
                text = f"{i:08d} " + "x" * (tokens - 10)  # distinct prompts: no lookup is cached anywhere
                req = GenerationRequest("text", "bench", text, None, None, 16, Sampling(), False, False)
                start = time.perf_counter()
                prepared = await router.scheduler.prepare(req, f"b{i}", None)
                router.scheduler.decide(prepared)
                if i >= 20:  # warm-up
                    times.append(time.perf_counter() - start)
            out[name] = _figure(times)
    finally:
        await router.stop()
        await index.stop()
        await nc.drain()
    return out


def _redis(url: str):
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=None)


async def _router_ttft(http: aiohttp.ClientSession, url: str, prompt: list[int]) -> float:
    body = {"model": "reference", "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    start = time.perf_counter()
    async with http.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise ConfigError(f"router answered {r.status}: {await r.text()}")
        await r.content.readline()
        ttft = time.perf_counter() - start
        await r.read()
    return ttft


async def _direct_ttft(caller: Caller, prompt: list[int]) -> float:
    first = asyncio.Event()
    start = time.perf_counter()
    task = asyncio.ensure_future(caller.request(prompt, "bo-d0", model="reference", max_tokens=2, prefill_instance="bo-p0",
                                                first_token=first))  # fmt: skip
    await first.wait()
    ttft = time.perf_counter() - start
    await task
    return ttft


async def _overhead_case(nats_url: str, redis_url: str, workdir: Path, rounds: int, requests: int) -> dict:
    """Router TTFT minus direct TTFT at concurrency 1 and 50, interleaved rounds."""
    procs = [
        GatewayProcess("prefill_gateway", gateway_env("prefill_gateway", nats_url, site=SITE, cluster="pd", instances="bo-p0",
                       backend="simulated:h200", model="reference", queue_limit=256, heartbeat_s=0.2), workdir / "p.log"),
        GatewayProcess("decode_gateway", gateway_env("decode_gateway", nats_url, site=SITE, instance="bo-d0",
                       backend="simulated:h20", model="reference", heartbeat_s=0.2), workdir / "d.log"),
    ]  # fmt: skip
    nc = await connect(nats_url, name="bench-overhead")
    index = KvIndexService(nc, _redis(redis_url), KvIndexConfig(nats_url=nats_url, redis_url=redis_url))
    config = RouterConfig(nats_url=nats_url, site=SITE, port=0, host="127.0.0.1", replan_interval_s=0, log_level="WARNING")
    router = RouterService(nc, config)
    tok = ByteTokenizer()
    samples: dict[str, list[float]] = {"router_c1": [], "direct_c1": [], "router_c50": [], "direct_c50": []}
    try:
        for proc in procs:
            proc.spawn()
        await asyncio.gather(procs[0].ready(nc, SITE, "bo-p0"), procs[1].ready(nc, SITE, "bo-d0"))
        await index.start()
        await router.start()
        while True:
            if {"bo-p0", "bo-d0"} <= {ld.instance for ld in router.view.alive()}:
                break
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http, Caller(nc, prefill_site=SITE, cluster="pd", decode_site=SITE) as caller:
            n = 0
            for _ in range(rounds):
                for label, conc, count in (("c1", 1, requests), ("c50", 50, 50)):
                    for path in ("router", "direct"):
                        prompts = [tok.encode(f"[{n + i}] overhead probe " * 16) for i in range(count)]
                        n += count
                        if conc == 1:
                            for p in prompts:
                                samples[f"{path}_{label}"].append(
                                    await (_router_ttft(http, router.url, p) if path == "router" else _direct_ttft(caller, p)))
                        else:
                            calls = [_router_ttft(http, router.url, p) if path == "router" else _direct_ttft(caller, p)
                                     for p in prompts]  # fmt: skip
                            samples[f"{path}_{label}"] += await asyncio.gather(*calls)
    finally:
        await router.stop()
        await index.stop()
        await nc.drain()
        for proc in procs:
            proc.stop()
    out = {}
    for label in ("c1", "c50"):
        r, d = samples[f"router_{label}"], samples[f"direct_{label}"]
        out[f"overhead_{label}"] = {
            "p50_ms": (_pct(r, 0.5) - _pct(d, 0.5)) * 1000,
            "p99_ms": (_pct(r, 0.99) - _pct(d, 0.99)) * 1000,
            "router_ttft": _figure(r),
            "direct_ttft": _figure(d),
        }
    return out


def run(args: argparse.Namespace) -> int:
    """Run both cases and print the figures (JSON with ``--json``)."""
    if min(args.decisions, args.rounds, args.requests) < 1:
        raise ConfigError("--decisions, --rounds and --requests must be >= 1")
    with tempfile.TemporaryDirectory(prefix="prfaas-bench-router-") as tmp:
        work = Path(tmp)
        nats = NatsServer(workdir=work / "nats").start()
        redis = RedisServer(workdir=work / "redis").start()
        try:
            figures = asyncio.run(_decision_case(nats.url, redis.url, args.decisions))
            figures |= asyncio.run(_overhead_case(nats.url, redis.url, work, args.rounds, args.requests))
        finally:
            redis.stop()
            nats.stop()
    figures["decision_p50_ms"] = figures["decision_32k"]["p50_ms"]
    figures["decision_p99_ms"] = figures["decision_32k"]["p99_ms"]
    figures["targets"] = {"decision_32k_p50_ms_max": TARGET_32K_P50_MS, "decision_32k_p99_ms_max": TARGET_32K_P99_MS,
                          "overhead_c50_p50_ms_max": TARGET_C50_P50_MS}  # fmt: skip
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    for name in ("decision_1k", "decision_32k"):
        f = figures[name]
        print(f"{name}: p50 {f['p50_ms']:.2f} ms  p99 {f['p99_ms']:.2f} ms  ({f['n']} decisions)")
    for name in ("overhead_c1", "overhead_c50"):
        f = figures[name]
        print(f"{name}: p50 {f['p50_ms']:+.2f} ms  p99 {f['p99_ms']:+.2f} ms  (router TTFT p50 "
              f"{f['router_ttft']['p50_ms']:.2f} ms vs direct {f['direct_ttft']['p50_ms']:.2f} ms)")  # fmt: skip
    return 0

