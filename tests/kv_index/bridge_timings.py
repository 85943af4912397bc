"""Time the bridge's paths end to end: engine batch published -> lookup finds its blocks.

Run ``python -m tests.kv_index.bridge_timings [--rounds 5] [--buffered 10000]``. It starts
nats-server, redis-server, publisher processes and an index in this process, then measures, in
interleaved rounds: a batch on the normal path (the baseline), a batch after a dropped one
(repaired from the replay socket), a batch after a dropped one without a replay socket (reset);
then a first contact that replays ``--buffered`` batches, against the same batches arriving live,
and the latency of lookups answered meanwhile. Medians with their range; ratios to the baseline
measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from libs.common.hashing import hash_list
from libs.lab.servers import NatsServer, RedisServer, free_port
from services.kv_index.client import KvIndexClient
from services.kv_index.config import parse_zmq_endpoints
from tests.kv_index.conftest import index_config, start_index
from tests.kv_index.vllm_publisher import EnginePublisher, store

BLOCKS_PER_BATCH = 2  # of ours, i.e. 8 engine blocks of 16 tokens


class _Prompts:
    """Fresh prompts, never seen before."""

    def __init__(self) -> None:
        self.next = 1

    def take(self) -> list[int]:
        first = self.next * 1_000
        self.next += 1
        return list(range(first, first + 64 * BLOCKS_PER_BATCH))


async def _until_found(
    client: KvIndexClient, instance: str, tokens: list[int], timeout_s: float = 120.0, latencies: list[float] | None = None
) -> None:
    """Poll lookups until the index finds ``tokens`` on ``instance`` (each lookup's latency into ``latencies``)."""
    hashes = hash_list(tokens, 64)
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        start = time.perf_counter()
        reply = await client.lookup(hashes, hybrid=False)
        if latencies is not None:
            latencies.append(time.perf_counter() - start)
        if any(i.instance == instance and i.attn_kv_blocks == BLOCKS_PER_BATCH for i in reply.instances):
            return
        await asyncio.sleep(0.002)
    raise TimeoutError(f"{instance}: prompt not found within {timeout_s}s")


async def _timed(client, engine: EnginePublisher, instance: str, prompts: _Prompts, dropped: int) -> float:
    """Seconds from publishing a batch (after ``dropped`` lost ones) until the index finds it."""
    for _ in range(dropped):
        await engine.send(store(prompts.take()), drop=True)
    tokens = prompts.take()
    start = time.perf_counter()
    await engine.send(store(tokens))
    await _until_found(client, instance, tokens)
    return time.perf_counter() - start


def _p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


def _summary(name: str, samples: list[float], base: float | None = None, base_name: str = "the normal path") -> str:
    ratio = f"  ({statistics.median(samples) / base:.2f}x {base_name})" if base else ""
    return f"{name:<44} median {statistics.median(samples) * 1e3:8.1f} ms  range {min(samples) * 1e3:.1f}-{max(samples) * 1e3:.1f}{ratio}"


async def _run(rounds: int, buffered: int, workdir: Path) -> None:
    nats = NatsServer(workdir=workdir / "nats").start()
    redis = RedisServer(workdir=workdir / "redis").start()
    engines: list[EnginePublisher] = []
    try:
        with_replay = await EnginePublisher.start("vllm-map-events", free_port(), free_port())
        without = await EnginePublisher.start("vllm-map-events", free_port())
        engines += [with_replay, without]
        endpoints = parse_zmq_endpoints((with_replay.endpoint("dc", "replay"), without.endpoint("dc", "plain")))
        config = index_config(nats.url, redis.url, zmq_endpoints=endpoints, zmq_heartbeat_s=0.1)
        service, close = await start_index(config)
        client = KvIndexClient(service.nc, timeout_s=5.0)
        prompts = _Prompts()
        try:
            for engine, instance in ((with_replay, "replay"), (without, "plain")):  # first contact
                while True:
                    try:
                        await _timed(client, engine, instance, prompts, 0)
                        break
                    except TimeoutError:
                        continue
            normal, repaired, reset = [], [], []
            for _ in range(rounds):
                normal.append(await _timed(client, with_replay, "replay", prompts, 0))
                repaired.append(await _timed(client, with_replay, "replay", prompts, 1))
                reset.append(await _timed(client, without, "plain", prompts, 1))
            idle = []
            probe = hash_list(prompts.take(), 64)
            for _ in range(300):
                start = time.perf_counter()
                await client.lookup(probe, hybrid=False)
                idle.append(time.perf_counter() - start)
            base = statistics.median(normal)
            print(_summary("normal path (baseline)", normal))
            print(_summary("gap repaired from the replay socket", repaired, base))
            print(_summary("gap without replay socket: reset", reset, base))
            print(_summary("lookups, bridge idle (baseline)", idle) + f"  p99 {_p99(idle) * 1e3:.1f} ms")
        finally:
            await close()
        await _first_contact(nats.url, redis.url, engines, prompts, rounds, buffered)
    finally:
        for engine in engines:
            await engine.stop()
        redis.stop()
        nats.stop()


async def _first_contact(nats_url: str, redis_url: str, engines: list, prompts: _Prompts, rounds: int, buffered: int) -> None:
    """A fresh index whose engine buffered ``buffered`` batches, against the same batches published live."""
    replayed, live, lookups = [], [], []
    for r in range(rounds):
        engine = await EnginePublisher.start("vllm-map-events", free_port(), free_port())
        engines.append(engine)
        batches = [[store(prompts.take())] for _ in range(buffered)]
        last = batches[-1][0]["tokens"]
        await engine.send_many(batches)
        endpoints = parse_zmq_endpoints((engine.endpoint("dc", f"buffered-{r}"),))
        start = time.perf_counter()
        config = index_config(nats_url, redis_url, zmq_endpoints=endpoints, zmq_heartbeat_s=0.1, lookup_timeout_s=5.0, redis_timeout_s=5.0)
        service, close = await start_index(config)
        try:
            await _until_found(KvIndexClient(service.nc, timeout_s=10.0), f"buffered-{r}", last, latencies=lookups)
            replayed.append(time.perf_counter() - start)
            batches = [[store(prompts.take())] for _ in range(buffered)]
            last = batches[-1][0]["tokens"]
            start = time.perf_counter()
            await engine.send_many(batches)
            await _until_found(KvIndexClient(service.nc, timeout_s=10.0), f"buffered-{r}", last)
            live.append(time.perf_counter() - start)
        finally:
            await close()
            await engine.stop()
    print(_summary(f"{buffered} batches arriving live (baseline)", live))
    print(_summary(f"first contact replaying {buffered} batches", replayed, statistics.median(live), "the live batches"))
    print(_summary("lookups during the replay", lookups) + f"  p99 {_p99(lookups) * 1e3:.1f} ms")


def main() -> None:
    """Print the timings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--buffered", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        asyncio.run(_run(args.rounds, args.buffered, Path(workdir)))


if __name__ == "__main__":
    main()
