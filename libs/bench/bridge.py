"""The KV index's engine bridge, end to end: an engine's batch published -> a lookup finds its blocks.

``prfaas bench bridge [--rounds 5] [--buffered 10000]`` starts nats-server, redis-server, engine
publisher processes (``libs.lab.vllm_publisher``, vLLM's wire format) and an index in this
process, then measures, in interleaved rounds: a batch on the normal path (the baseline), a batch after a dropped one
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

from libs.bench.targets import conclude
from libs.common.errors import BadRequest
from libs.common.hashing import hash_list
from libs.lab.servers import NatsServer, RedisServer, free_port
from libs.lab.vllm_publisher import EnginePublisher, store
from services.kv_index.client import KvIndexClient
from services.kv_index.config import KvIndexConfig, parse_zmq_endpoints
from services.kv_index.service import start_in_process

BLOCKS_PER_BATCH = 2  # of ours, i.e. 8 engine blocks of 16 tokens


def _index_config(nats_url: str, redis_url: str, **overrides) -> KvIndexConfig:
    """The index's settings with short deadlines, as a bench wants them."""
    base = dict(
        nats_url=nats_url,
        redis_url=redis_url,
        lookup_timeout_s=0.5,
        redis_timeout_s=0.3,
        fetch_timeout_s=0.2,
        retry_backoff_max_s=0.2,
    )
    return KvIndexConfig(**(base | overrides))


class _Prompts:
    """Fresh prompts, never seen before."""

    def __init__(self) -> None:
        self.next = 1

    def take(self) -> list[int]:
        first = self.next * 1_000
        self.next += 1
        return list(range(first, first + 64 * BLOCKS_PER_BATCH))


async def _until_found(
    client: KvIndexClient,
    instance: str,
    tokens: list[int],
    timeout_s: float = 120.0,
    latencies: list[float] | None = None,
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


def _figure(samples: list[float], base: float | None = None) -> dict:
    """Median and range in ms (and the ratio of the median to ``base``, seconds)."""
    fig = {"median_ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3, "max_ms": max(samples) * 1e3}
    if base:
        fig["vs_baseline"] = statistics.median(samples) / base
    return fig


def _line(name: str, fig: dict, base_name: str = "") -> str:
    ratio = f"  ({fig['vs_baseline']:.2f}x {base_name})" if "vs_baseline" in fig else ""
    p99 = f"  p99 {fig['p99_ms']:.1f} ms" if "p99_ms" in fig else ""
    return f"{name:<44} median {fig['median_ms']:8.1f} ms  range {fig['min_ms']:.1f}-{fig['max_ms']:.1f}{ratio}{p99}"


async def _run(rounds: int, buffered: int, workdir: Path) -> dict:
    nats = NatsServer(workdir=workdir / "nats").start()
    redis = RedisServer(workdir=workdir / "redis").start()
    engines: list[EnginePublisher] = []
    try:
        with_replay = await EnginePublisher.start("vllm-map-events", free_port(), free_port())
        without = await EnginePublisher.start("vllm-map-events", free_port())
        engines += [with_replay, without]
        endpoints = parse_zmq_endpoints((with_replay.endpoint("dc", "replay"), without.endpoint("dc", "plain")))
        config = _index_config(nats.url, redis.url, zmq_endpoints=endpoints, zmq_heartbeat_s=0.1)
        service, close = await start_in_process(config, "kv_index-bench")
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
            figures = {
                "normal": _figure(normal),
                "repaired": _figure(repaired, base),
                "reset": _figure(reset, base),
                "lookups_idle": _figure(idle) | {"p99_ms": _p99(idle) * 1e3},
            }
        finally:
            await close()
        return figures | await _first_contact(nats.url, redis.url, engines, prompts, rounds, buffered)
    finally:
        for engine in engines:
            await engine.stop()
        redis.stop()
        nats.stop()


async def _first_contact(
    nats_url: str, redis_url: str, engines: list, prompts: _Prompts, rounds: int, buffered: int
) -> dict:
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
        config = _index_config(
            nats_url, redis_url, zmq_endpoints=endpoints, zmq_heartbeat_s=0.1, lookup_timeout_s=5.0, redis_timeout_s=5.0
        )
        service, close = await start_in_process(config, "kv_index-bench")
        client = KvIndexClient(service.nc, timeout_s=10.0)
        try:
            await _until_found(client, f"buffered-{r}", last, latencies=lookups)
            replayed.append(time.perf_counter() - start)
            batches = [[store(prompts.take())] for _ in range(buffered)]
            last = batches[-1][0]["tokens"]
            start = time.perf_counter()
            await engine.send_many(batches)
            await _until_found(client, f"buffered-{r}", last)
            live.append(time.perf_counter() - start)
        finally:
            await close()
            await engine.stop()
    return {
        "live": _figure(live),
        "first_contact_replay": _figure(replayed, statistics.median(live)),
        "lookups_during_replay": _figure(lookups) | {"p99_ms": _p99(lookups) * 1e3},
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each path (default %(default)s)")
    parser.add_argument(
        "--buffered",
        type=int,
        default=10_000,
        help="batches an engine holds for replay at first contact (default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    """Start servers, engines and the index, measure every path, print the figures and verdicts (exit 1 on a miss)."""
    if args.rounds < 1 or args.buffered < 1:
        raise BadRequest(f"--rounds and --buffered must be >= 1, got {args.rounds} and {args.buffered}")
    with tempfile.TemporaryDirectory(prefix="prfaas-bench-bridge-") as workdir:
        figures = asyncio.run(_run(args.rounds, args.buffered, Path(workdir)))
    figures |= {"rounds": args.rounds, "buffered": args.buffered}
    rows = [
        _line("normal path (baseline)", figures["normal"]),
        _line("gap repaired from the replay socket", figures["repaired"], "the normal path"),
        _line("gap without replay socket: reset", figures["reset"], "the normal path"),
        _line("lookups, bridge idle (baseline)", figures["lookups_idle"]),
        _line(f"{args.buffered} batches arriving live (baseline)", figures["live"]),
        _line(f"first contact replaying {args.buffered} batches", figures["first_contact_replay"], "the live batches"),
        _line("lookups during the replay", figures["lookups_during_replay"]),
    ]
    return conclude(args, figures, "\n".join(rows))
