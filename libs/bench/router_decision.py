"""The router's decision at 1K and 32K tokens against its floor: the index lookup the decision cannot do without.

A router in this process, with a Hugging Face ``tokenizer.json`` (trained here, offline), reads a
32-instance view (8 PrfaaS prefill, 8 local prefill, 16 decode heartbeats) and asks the KV index
(its own process, Redis) about prompts whose prefix the index holds: every prompt is a long shared
text and a short distinct question, and the shared text's blocks (both state kinds, every block)
are stored on one PrfaaS instance through the index's real ingest path, so each lookup walks the
whole prefix (512 blocks at 32K) and answers a hit. A decision is tokenize + hash + lookup + live
view + policy (``Scheduler.prepare`` and ``decide``). Interleaved with the decisions, its floor is
timed on the same prompt's block hashes: the lookup request/reply over NATS to the index
(``lookup_nats``), and the Lua walk alone, straight to Redis (``lua_walk``). ``vs_floor`` is the
decision's median over the lookup's; ``tokenize`` times the tokenizer alone on a sample;
``index_late`` counts decisions whose lookup missed the router's deadline (the router then decides
without it, as it would in service).

The router caches tokenizations by prompt prefix (``services/router/token_cache.py``), and these
prompts share all but their question, so the figures are those of a prompt whose shared text the
router has tokenized before (warm: its last request's). ``cold`` times, interleaved with them, the
decision for a prompt the router has never seen (its token cache cleared first: a restarted router,
or another router's conversation), against the same floor; only its question differs from the warm
ones, so the index still holds its prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from libs.bench.hf_tokenizer import Prose, write_tokenizer
from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.errors import PrfaasError, UpstreamTimeout
from libs.common.hashing import hash_list
from libs.common.messages import BlocksStored, InstanceLoad, KvEventBatch, Sampling, encode
from services.kv_index.client import KvIndexClient
from services.kv_index.store import RedisKvStore, pack_hashes
from services.router.config import RouterConfig
from services.router.schemas import GenerationRequest
from services.router.service import RouterService

SITE, REMOTE = "dc-pd", "dc-prfaas"
MODEL, PROFILE = "bench", "kimi-linear-1t"
HOLDER = "bp-r0"  # the PrfaaS instance the index says holds every prompt's shared prefix
LENGTHS = (("decision_1k", 1024), ("decision_32k", 32768))
QUESTION_TOKENS = 16  # about: the distinct end of each prompt
WARMUP = 20
TOKENIZE_SAMPLES = 20


def _loads() -> list[InstanceLoad]:
    now = time.time()
    loads = [
        InstanceLoad(
            site=REMOTE,
            instance=f"bp-r{i}",
            role="prefill",
            cluster="prfaas",
            hardware="h200",
            model=MODEL,
            queue_depth=i % 3,
            expected_wait_s=0.1 * i,
            ts=now,
        )
        for i in range(8)
    ]
    loads += [
        InstanceLoad(
            site=SITE,
            instance=f"bp-l{i}",
            role="prefill",
            cluster="pd",
            hardware="h20",
            model=MODEL,
            queue_depth=i % 2,
            expected_wait_s=0.2 * i,
            ts=now,
        )
        for i in range(8)
    ]
    loads += [
        InstanceLoad(
            site=SITE,
            instance=f"bp-d{i}",
            role="decode",
            cluster="pd",
            hardware="h20",
            model=MODEL,
            free_decode_slots=4 + i,
            max_batch=32,
            ts=now,
        )
        for i in range(16)
    ]
    return loads


async def _heartbeats(nc, stop: asyncio.Event) -> None:
    """Every instance of the view heartbeats twice a second (the index answers only for live instances)."""
    while not stop.is_set():
        for load in _loads():
            await nc.publish(subjects.load(load.site, load.instance), encode(load))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await stop.wait()


def _shared_text(prose: Prose, tokenizer: Path, tokens: int) -> str:
    """Generated text of about ``tokens - QUESTION_TOKENS`` tokens of ``tokenizer`` (cut at a word)."""
    from tokenizers import Tokenizer

    text = prose.text(tokens, seed=tokens)  # words outnumber their tokens
    offsets = Tokenizer.from_file(str(tokenizer)).encode(text).offsets  # where each token starts
    return text[: text.rfind(" ", 0, offsets[tokens - QUESTION_TOKENS][0])]


def _prompt(shared: str, i: int) -> str:
    return f"{shared} Question {i:06d}: where does this prompt's prefix live?"


def _hashes(router: RouterService, text: str) -> list[int]:
    """The prompt's block hashes as the router computes them."""
    _, ids = router.scheduler.tokenizer.encode_with_array(text, add_special=True)
    return hash_list(ids, router.scheduler.config.block_size)


async def _store_prefix(client: KvIndexClient, seq: int, hashes: list[int], timeout_s: float = 30.0) -> None:
    """Publish ``hashes`` as held by ``HOLDER`` (both state kinds) through JetStream; wait until a lookup finds them."""
    nc = client.nc
    batch = KvEventBatch(
        site=REMOTE,
        instance=HOLDER,
        seq=seq,
        ts=time.time(),
        events=[BlocksStored(block_hashes=hashes), BlocksStored(block_hashes=hashes, kind="linear_state")],
    )
    await nc.jetstream(timeout=10).publish(subjects.kv_events(REMOTE, HOLDER), encode(batch))
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        reply = await client.lookup(hashes)
        if any(p.instance == HOLDER and p.usable_blocks == len(hashes) for p in reply.instances):
            return
        await asyncio.sleep(0.05)
    raise UpstreamTimeout(f"the index did not show {len(hashes)} blocks on {HOLDER} within {timeout_s:.0f}s")


def _figure(values_s: list[float]) -> dict:
    ordered = sorted(values_s)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50_ms": pick(0.5), "p99_ms": pick(0.99), "n": len(ordered)}


async def _decision(router: RouterService, text: str, request_id: str, held: int):
    """One decision's time and its prepared request (an answered lookup must have found the held prefix)."""
    req = GenerationRequest("text", MODEL, text, None, None, 16, Sampling(), False, False)
    start = time.perf_counter()
    prepared = await router.scheduler.prepare(req, request_id, None)
    router.scheduler.decide(prepared)
    elapsed = time.perf_counter() - start
    if prepared.lookup is not None and not any(
        p.instance == HOLDER and p.usable_blocks >= held for p in prepared.lookup.instances
    ):
        raise PrfaasError(f"a timed lookup missed the {held} blocks stored on {HOLDER}")
    return elapsed, prepared  # no lookup: the index was late (past the router's deadline) or failed; counted


async def _one_length(router: RouterService, shared: str, store: RedisKvStore, seq: int, decisions: int) -> dict:
    """Time decisions of prompts ``shared`` + a question, whose shared blocks the index holds, and their floors."""
    common = _hashes(router, _prompt(shared, 0))
    other = _hashes(router, _prompt(shared, 1))
    held = next(
        (k for k, (a, b) in enumerate(zip(common, other, strict=False)) if a != b), min(len(common), len(other))
    )
    client = KvIndexClient(router.nc, timeout_s=5.0)
    await _store_prefix(client, seq, common[:held])
    times, cold_s, nats_s, lua_s, lengths, late, cold_late = [], [], [], [], [], 0, 0
    for i in range(decisions + WARMUP):
        router.scheduler.token_cache.clear()  # a prompt the router has not seen
        elapsed, prepared = await _decision(router, _prompt(shared, -1 - i), f"b{seq}-cold-{i}", held)
        cold_late += i >= WARMUP and prepared.lookup is None
        cold_s.append(elapsed)
        elapsed, prepared = await _decision(router, _prompt(shared, i), f"b{seq}-{i}", held)  # shares the one before
        late += i >= WARMUP and prepared.lookup is None
        hashes = hash_list(np.asarray(prepared.prompt_ids, dtype=np.int64), prepared.block_size)
        start = time.perf_counter()
        await client.lookup(hashes, hybrid=prepared.profile.n_linear_layers > 0)
        lookup = time.perf_counter() - start
        start = time.perf_counter()
        await store.lookup(pack_hashes(hashes), time.time(), prepared.profile.n_linear_layers > 0)
        lua = time.perf_counter() - start
        if i >= WARMUP:
            times.append(elapsed)
            nats_s.append(lookup)
            lua_s.append(lua)
            lengths.append(len(prepared.prompt_ids))
    tokenize_s = []
    for i in range(min(decisions, TOKENIZE_SAMPLES)):
        text = _prompt(shared, decisions + WARMUP + i)
        start = time.perf_counter()
        router.scheduler.tokenizer.encode_with_array(text, add_special=True)
        tokenize_s.append(time.perf_counter() - start)
    figure, cold = _figure(times), _figure(cold_s[WARMUP:])
    floor = {"lookup_nats": _figure(nats_s), "lua_walk": _figure(lua_s)}
    cold |= {"vs_floor": cold["p50_ms"] / floor["lookup_nats"]["p50_ms"], "index_late": cold_late}
    return figure | {
        "prompt_tokens": int(statistics.median(lengths)),
        "held_blocks": held,
        "index_late": late,
        "floor": floor,
        "vs_floor": figure["p50_ms"] / floor["lookup_nats"]["p50_ms"],
        "cold": cold,
        "tokenize": _figure(tokenize_s),
    }


async def decision_case(nats_url: str, redis_url: str, workdir: Path, decisions: int) -> dict:
    """Both prompt lengths against a live index holding their prefixes, a 32-instance view and a tokenizer.json."""
    prose = Prose()
    tokenizer = await asyncio.to_thread(write_tokenizer, workdir / "tokenizer", prose)
    nc = await connect(nats_url, name="bench-router")
    config = RouterConfig(
        nats_url=nats_url,
        site=SITE,
        port=0,
        host="127.0.0.1",
        replan_interval_s=0,
        instance_ttl_s=600,
        default_model_profile=PROFILE,
        policy="adaptive",
        threshold_tokens=19_392,
        tokenizer=str(tokenizer),
    )
    router = RouterService(nc, config)
    redis = aioredis.Redis.from_url(redis_url)
    stop = asyncio.Event()
    beats = None
    out = {}
    try:
        await router.start()
        beats = asyncio.create_task(_heartbeats(nc, stop))
        await settle(nc)
        async with asyncio.timeout(60):
            while True:  # every heartbeat seen, and the index answering
                if len(router.view.alive()) >= 32 and (await router.readiness())["index"]:
                    break
                await asyncio.sleep(0.05)
        store = RedisKvStore(redis)
        for seq, (name, tokens) in enumerate(LENGTHS, start=1):
            shared = await asyncio.to_thread(_shared_text, prose, tokenizer, tokens)
            out[name] = await _one_length(router, shared, store, seq, decisions)
    finally:
        stop.set()
        if beats is not None:
            await beats
        await router.stop()
        await redis.aclose()
        await nc.drain()
    return out
