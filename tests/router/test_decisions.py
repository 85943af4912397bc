"""Decisions as the router makes them: explain, cache hits from the index, index outages, the live view."""

from __future__ import annotations

import time

import aiohttp
import msgspec

from libs.common import subjects
from libs.common.hashing import hash_list
from libs.common.messages import BlocksStored, DecisionEvent
from libs.engine.profiles import HARDWARE, MODELS
from libs.engine.tokenizer import ByteTokenizer
from tests.kv_index.conftest import Producer, eventually
from tests.router.conftest import HTTP_TIMEOUT, PD, PRFAAS, heartbeat, load, ready_router

LOADS = (load("d0"), load("p-local", role="prefill"), load("p-remote", role="prefill", site=PRFAAS))
LONG = "a long document about prefill. " * 40  # 1,241 tokens with BOS
SHORT = "a short question"


async def explain(svc, body: dict, headers: dict | None = None) -> DecisionEvent:
    """POST /v1/route/explain and decode the decision event it returns."""
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(svc.url + "/v1/route/explain", json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-prfaas-request-id"]
            return msgspec.json.decode(await r.read(), type=DecisionEvent)


async def test_explain_offloads_long_and_keeps_short_local(start_router, nc, kv_index):
    """Above the threshold the uncached prompt is prefilled remotely; below it, locally."""
    svc = await ready_router(start_router, nc, *LOADS, policy="static-threshold", threshold_tokens=512)
    long = await explain(svc, {"model": "reference", "prompt": LONG})
    assert (
        long.route == "remote"
        and long.decision.prefill_instance == "p-remote"
        and long.decision.decode_instance == "d0"
    )
    assert long.prompt_tokens == len(LONG) + 1 and long.incremental_tokens == long.prompt_tokens
    assert long.threshold_tokens == 512 and long.index == "ok" and long.decision.candidates
    short = await explain(svc, {"model": "reference", "messages": [{"role": "user", "content": SHORT}]})
    assert short.route == "local" and short.decision.prefill_instance == "p-local"
    assert short.decision.transport == long.decision.transport == "tcp"  # the KV moves between instances either way


async def test_cached_prefix_counts_only_the_incremental_length(start_router, nc, kv_index):
    """A prefix cached at the PD site leaves only the rest to prefill: the long prompt stays local."""
    svc = await ready_router(start_router, nc, *LOADS, policy="static-threshold", threshold_tokens=512)
    hashes = hash_list(ByteTokenizer().encode(LONG), 64)
    producer = Producer(nc, PD, "p-local")
    await producer.send(
        BlocksStored(block_hashes=hashes, kind="attn_kv"), BlocksStored(block_hashes=hashes, kind="linear_state")
    )

    async def hit() -> bool:
        return (await explain(svc, {"model": "reference", "prompt": LONG})).cached_tokens.get(PD, 0) > 0

    await eventually(hit, what="index knows the prefix")
    event = await explain(svc, {"model": "reference", "prompt": LONG})
    assert event.cached_tokens == {PD: len(hashes) * 64}
    assert event.incremental_tokens == event.prompt_tokens - len(hashes) * 64
    assert event.route == "local" and event.decision.reused_prefix_tokens == len(hashes) * 64


async def test_index_outage_routes_without_cache_knowledge(start_router, nc, kv_index, redis_server):
    """With the index's store down the request is still decided, and the decision says why it saw no cache."""
    svc = await ready_router(start_router, nc, *LOADS, policy="static-threshold", threshold_tokens=512)
    redis_server.stop()
    event = await explain(svc, {"model": "reference", "prompt": LONG})
    assert event.index.startswith("unavailable: index_unavailable") and event.cached_tokens == {}
    assert event.route == "remote"


async def test_index_missing_routes_within_the_deadline(start_router, nc):
    """No index process at all: the lookup's deadline passes and the decision says so."""
    svc = await ready_router(
        start_router, nc, *LOADS, index_timeout_s=0.05, index_min_timeout_s=0.05, threshold_tokens=512
    )
    event = await explain(svc, {"model": "reference", "prompt": LONG})
    assert event.index.startswith("unavailable: upstream_timeout")


async def test_lookup_waits_no_longer_than_a_hit_could_save(start_router, nc):
    """An index that does not answer: a prompt whose full hit would save ~nothing gives up at the floor (or is not asked
    about when within t); a long one waits more."""

    async def ignore(msg) -> None:
        """Take a lookup and never answer it."""

    await nc.subscribe(subjects.KV_LOOKUP, cb=ignore)
    svc = await ready_router(
        start_router, nc, *LOADS, index_timeout_s=1.0, index_min_timeout_s=0.01, threshold_tokens=512
    )
    started = time.monotonic()
    event = await explain(svc, {"model": "reference", "prompt": LONG})  # the reference model prefills it in ~2 ms
    assert event.index.startswith("unavailable: no answer within 10.0 ms")
    assert time.monotonic() - started < 0.5  # the full deadline would be 1 s; 0.5 s leaves room on a loaded machine
    short = await explain(svc, {"model": "reference", "prompt": LONG[:500]})  # within t: local whatever is cached
    assert short.index == "not asked: a full cache hit would save under 10.0 ms" and short.route == "local"
    slow = await ready_router(
        start_router,
        nc,
        *LOADS,
        index_timeout_s=1.0,
        index_min_timeout_s=0.01,
        model_profiles={"reference": "kimi-linear-1t"},
    )
    hit_saves_s = MODELS["kimi-linear-1t"].prefill_time_s(len(LONG) + 1, HARDWARE["h20"]) - MODELS[
        "kimi-linear-1t"
    ].prefill_time_s(64, HARDWARE["h20"])
    event = await explain(slow, {"model": "reference", "prompt": LONG})
    assert event.index.startswith(f"unavailable: no answer within {hit_saves_s * 1000:.1f} ms")
    event = await explain(slow, {"model": "reference", "prompt": LONG * 30})  # 37K tokens: seconds to save
    assert event.index.startswith("unavailable: no answer within 1000.0 ms")


async def test_ttft_slo_is_recorded(start_router, nc, kv_index):
    """x-prfaas-ttft-slo-ms is recorded with whether the predicted TTFT meets it; a bad value is a 400."""
    svc = await ready_router(start_router, nc, *LOADS)
    body = {"model": "reference", "prompt": SHORT}
    met = await explain(svc, body, {"x-prfaas-ttft-slo-ms": "60000"})
    assert met.ttft_slo_s == 60.0 and met.slo_met is True
    missed = await explain(svc, body, {"x-prfaas-ttft-slo-ms": "0.0001"})
    assert missed.slo_met is False
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(svc.url + "/v1/route/explain", json=body, headers={"x-prfaas-ttft-slo-ms": "soon"}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "x-prfaas-ttft-slo-ms"


async def test_decode_capacity_spreads_and_refuses(start_router, nc, kv_index):
    """Decode goes to the instance with free slots; with none anywhere the request waits on the shortest queue."""
    full = load("d0", free_decode_slots=0, expected_wait_s=5.0)
    svc = await ready_router(start_router, nc, full, load("d1", free_decode_slots=4), load("p-local", role="prefill"))
    assert (await explain(svc, {"model": "reference", "prompt": SHORT})).decision.decode_instance == "d1"
    await heartbeat(nc, load("d1", free_decode_slots=0, expected_wait_s=1.0))
    await eventually(_async(lambda: svc.view.load_of("d1").free_decode_slots == 0))
    event = await explain(svc, {"model": "reference", "prompt": SHORT})
    assert event.decision.decode_instance == "d1" and event.decision.predicted_ttft_s >= 1.0


def _async(check):
    async def run() -> bool:
        return check()

    return run
