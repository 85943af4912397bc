"""KV index benchmark: lookup latency of a 2,048-block prompt over 1M indexed blocks, and ingest rate.

Starts its own nats-server and redis-server, runs the kv_index service in a separate process,
loads the index through the real path (JetStream -> durable consumer -> Redis), then times
lookups end to end through NATS from this process. Targets: p50 <= 5 ms, p99 <= 20 ms,
ingest >= 20,000 block events/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from libs.bench.targets import conclude
from libs.common import subjects
from libs.common.bus import connect
from libs.common.errors import BadRequest, PrfaasError, UpstreamTimeout
from libs.common.hashing import hash_list
from libs.common.messages import BlocksStored, InstanceLoad, KvEventBatch, encode
from libs.lab.servers import NatsServer, RedisServer
from services.kv_index.client import KvIndexClient


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument(
        "--blocks", type=int, default=1_000_000, help="attn_kv blocks in the index (default %(default)s)"
    )
    parser.add_argument("--instances", type=int, default=16, help="instances holding them (default %(default)s)")
    parser.add_argument(
        "--prompt-blocks", type=int, default=2048, help="blocks in the looked-up prompt (default %(default)s)"
    )
    parser.add_argument("--lookups", type=int, default=500, help="timed lookups (default %(default)s)")
    parser.add_argument("--batch-blocks", type=int, default=512, help="block hashes per event (default %(default)s)")
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the work dir (server and index logs) after success"
    )


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _instance_blocks(args: argparse.Namespace, prompt: list[int]) -> list[list[int]]:
    """Per instance: a growing prefix of the prompt (instance k holds (k+1)/n of it), then filler."""
    rng = np.random.default_rng(7)
    per_instance = args.blocks // args.instances
    out = []
    for k in range(args.instances):
        held = prompt[: max(1, (k + 1) * len(prompt) // args.instances)]
        filler = rng.integers(1, 2**63, per_instance - len(held), dtype=np.uint64).tolist()
        out.append(held + filler)
    return out


async def _load(nc, blocks: list[list[int]], batch_blocks: int) -> int:
    """Publish every instance's blocks (plus a linear checkpoint every 4 blocks); returns block events."""
    js = nc.jetstream(timeout=10)
    events = 0
    pending = []
    for k, hashes in enumerate(blocks):
        site, instance = f"dc-{k % 2}", f"inst-{k}"
        for seq, start in enumerate(range(0, len(hashes), batch_blocks), start=1):
            chunk = hashes[start : start + batch_blocks]
            checkpoints = chunk[3::4]
            batch = KvEventBatch(
                site=site,
                instance=instance,
                seq=seq,
                ts=time.time(),
                events=[BlocksStored(block_hashes=chunk), BlocksStored(block_hashes=checkpoints, kind="linear_state")],
            )
            pending.append(js.publish(subjects.kv_events(site, instance), encode(batch)))
            events += len(chunk) + len(checkpoints)
            if len(pending) >= 64:
                await asyncio.gather(*pending)
                pending.clear()
    await asyncio.gather(*pending)
    return events


async def _heartbeats(nc, instances: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        for k in range(instances):
            load = InstanceLoad(site=f"dc-{k % 2}", instance=f"inst-{k}", role="prefill", ts=time.time())
            await nc.publish(subjects.load(f"dc-{k % 2}", f"inst-{k}"), encode(load))
        await asyncio.sleep(1.0)


async def _drained(nc, deadline_s: float) -> None:
    """Wait until the index's consumer has nothing pending or unacknowledged."""
    jsm = nc.jetstream()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        info = await jsm.consumer_info(subjects.KV_EVENTS_STREAM, "kv-index")
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return
        await asyncio.sleep(0.05)
    raise UpstreamTimeout(f"index did not finish ingesting within {deadline_s}s")


async def _bench(args: argparse.Namespace, nats_url: str) -> dict:
    nc = await connect(nats_url, name="bench-kvindex")
    stop = asyncio.Event()
    beats = asyncio.create_task(_heartbeats(nc, args.instances, stop))
    try:
        client = KvIndexClient(nc, timeout_s=5.0)
        prompt = hash_list(np.random.default_rng(3).integers(0, 150_000, args.prompt_blocks * 64))
        ready_end = time.monotonic() + 30
        while True:
            try:
                await client.lookup(prompt[:1])
                break
            except PrfaasError:
                if time.monotonic() > ready_end:
                    raise
                await asyncio.sleep(0.1)
        blocks = _instance_blocks(args, prompt)
        _log(f"loading {args.blocks:,} blocks over {args.instances} instances through JetStream ...")
        start = time.perf_counter()
        events = await _load(nc, blocks, args.batch_blocks)
        await _drained(nc, deadline_s=600)
        ingest_s = time.perf_counter() - start
        _log(f"ingested {events:,} block events in {ingest_s:.1f}s; timing {args.lookups} lookups ...")
        visible_end = time.monotonic() + 10
        reply = await client.lookup(prompt)
        while len(reply.instances) < args.instances and time.monotonic() < visible_end:
            await asyncio.sleep(0.1)  # heartbeats arrive every second
            reply = await client.lookup(prompt)
        for _ in range(20):
            reply = await client.lookup(prompt)
        latencies = []
        for _ in range(args.lookups):
            t0 = time.perf_counter()
            reply = await client.lookup(prompt)
            latencies.append((time.perf_counter() - t0) * 1e3)
        best = reply.instances[0] if reply and reply.instances else None
        return {
            "lookup_p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "lookup_p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "ingest_events_per_s": round(events / ingest_s, 1),
            "index_blocks": args.blocks,
            "instances": args.instances,
            "prompt_blocks": args.prompt_blocks,
            "instances_holding_prompt": len(reply.instances) if reply else 0,
            "best_usable_blocks": best.usable_blocks if best else 0,
        }
    finally:
        stop.set()
        await beats
        await nc.drain()


def run(args: argparse.Namespace) -> int:
    """Start servers and the service, run the benchmark, print the figures and verdicts (exit 1 on a miss)."""
    if args.instances < 1 or args.prompt_blocks < 1 or args.blocks < args.prompt_blocks:
        raise BadRequest("need --instances >= 1, --prompt-blocks >= 1 and --blocks >= --prompt-blocks")
    if args.lookups < 1 or args.batch_blocks < 1:
        raise BadRequest(f"--lookups and --batch-blocks must be >= 1, got {args.lookups} and {args.batch_blocks}")
    workdir = Path(tempfile.mkdtemp(prefix="prfaas-bench-kvindex-"))
    ok = False
    try:
        figures = _run_servers_and_bench(args, workdir)
        ok = True
    finally:
        if ok and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            _log(f"logs kept in {workdir}")
    return conclude(args, figures, _text(figures))


def _run_servers_and_bench(args: argparse.Namespace, workdir: Path) -> dict:
    """NATS, Redis and the index in its own process (log in ``workdir``), then the measurement."""
    nats_server = NatsServer(workdir=workdir / "nats").start()
    redis_server = RedisServer(workdir=workdir / "redis").start()
    env = dict(
        os.environ, KV_INDEX_NATS_URL=nats_server.url, KV_INDEX_REDIS_URL=redis_server.url, KV_INDEX_LOG_LEVEL="WARNING"
    )
    with open(workdir / "kv_index.log", "wb") as log:
        service = subprocess.Popen([sys.executable, "-m", "services.kv_index"], env=env, stdout=log, stderr=log)
    try:
        return asyncio.run(_bench(args, nats_server.url))
    finally:
        service.terminate()
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            service.kill()
        nats_server.stop()
        redis_server.stop()


def _text(figures: dict) -> str:
    """The figures for people (the verdicts follow)."""
    return "\n".join(
        [
            *(f"{key:22s} {figures[key]:>12,.3f}" for key in ("lookup_p50_ms", "lookup_p99_ms", "ingest_events_per_s")),
            f"index: {figures['index_blocks']:,} blocks over {figures['instances']} instances; prompt "
            f"{figures['prompt_blocks']} blocks held (in part) by {figures['instances_holding_prompt']} instances",
        ]
    )
