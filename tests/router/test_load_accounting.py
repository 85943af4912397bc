"""What a router counts against an instance: its own jobs until heartbeats show them, and cache affinity that yields
to queueing."""

from __future__ import annotations

import contextlib

import aiohttp
import msgspec

from libs.common.hashing import hash_list
from libs.common.messages import BlocksStored, DecisionEvent
from libs.engine.profiles import HARDWARE, MODELS, model_profile
from libs.engine.tokenizer import ByteTokenizer
from tests.kv_index.conftest import Producer, eventually
from tests.router.conftest import HTTP_TIMEOUT, PD, heartbeat, load, ready_router, until

REFERENCE = model_profile("reference")


def free_slots(svc, instance: str) -> int:
    """Free decode slots of ``instance`` in the view the router's policy reads now."""
    view = svc.view.cluster_view("reference", REFERENCE)
    return next(i.free_decode_slots for i in view.decode if i.name == instance)


async def test_two_routers_count_each_job_once(fleet, routed):
    """Two routers streaming to one decode instance: each counts its own job until a heartbeat shows it, then only the
    heartbeat, so both end up seeing both jobs exactly once."""
    await fleet.start_async(
        ("prefill_gateway", PD, "tr-l0", {"cluster": "tr-pd"}),
        ("decode_gateway", PD, "tr-d0", {"max_batch": 4, "heartbeat_s": 1.0}),
    )
    a, _ = await routed(("tr-l0", "tr-d0"), router_id="router-a")
    b, _ = await routed(("tr-l0", "tr-d0"), router_id="router-b")
    body = {
        "model": "reference",
        "prompt": "Stream a long answer.",
        "max_tokens": 4000,
        "temperature": 0.7,
        "seed": 1,
        "stream": True,
    }  # ~20 s of decoding (no early end of sequence)
    async with contextlib.AsyncExitStack() as streams:
        http = await streams.enter_async_context(aiohttp.ClientSession(timeout=HTTP_TIMEOUT))
        first = await streams.enter_async_context(http.post(a.url + "/v1/completions", json=body))
        await first.content.readline()  # decoding: router a's job is acknowledged
        assert free_slots(a, "tr-d0") == 3  # counted by a before any heartbeat shows it (1 s apart)
        second = await streams.enter_async_context(http.post(b.url + "/v1/completions", json=body))
        await second.content.readline()
        for svc in (a, b):  # once heartbeats show both jobs, each router counts them once
            await until(
                lambda svc=svc: svc.view.corrections("tr-d0") == 0, timeout_s=5.0, what="heartbeat with both jobs"
            )
            await until(lambda svc=svc: free_slots(svc, "tr-d0") == 2, timeout_s=5.0, what="both jobs seen")
            assert svc.view.load_of("tr-d0").free_decode_slots == 2


async def test_hot_prefix_spreads_once_waiting_exceeds_recomputing(start_router, nc, kv_index):
    """A prompt cached on one instance goes there while its queue is shorter than the prefill the cache saves, and to an
    idle instance once waiting would take longer than recomputing."""
    svc = await ready_router(
        start_router,
        nc,
        load("d0"),
        load("pl0", role="prefill"),
        load("pl1", role="prefill"),
        policy="static-threshold",
        model_profiles={"reference": "kimi-linear-1t"},
    )
    prompt = "a hot shared prefix, a long system prompt. " * 200  # 8,601 tokens with BOS
    hashes = hash_list(ByteTokenizer().encode(prompt), 64)
    await Producer(nc, PD, "pl0").send(
        BlocksStored(block_hashes=hashes, kind="attn_kv"), BlocksStored(block_hashes=hashes, kind="linear_state")
    )

    async def explain() -> DecisionEvent:
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            async with http.post(svc.url + "/v1/route/explain", json={"model": "reference", "prompt": prompt}) as r:
                return msgspec.json.decode(await r.read(), type=DecisionEvent)

    async def cached() -> bool:
        return (await explain()).cached_tokens.get(PD, 0) > 0

    await eventually(cached, what="index knows the prefix")
    kimi, h20 = MODELS["kimi-linear-1t"], HARDWARE["h20"]
    saved_s = kimi.prefill_time_s(len(prompt) + 1, h20) - kimi.prefill_time_s(len(prompt) + 1 - len(hashes) * 64, h20)
    assert saved_s > 1.0  # the effect is seconds; the tie tolerance (5%, 50 ms) is far smaller
    for wait_s, holder in ((0.0, True), (saved_s * 0.7, True), (saved_s * 1.3, False)):
        await heartbeat(nc, load("pl0", role="prefill", queue_depth=3, expected_wait_s=wait_s))
        await until(lambda w=wait_s: svc.view.load_of("pl0").expected_wait_s == w, what="heartbeat")
        decision = (await explain()).decision
        assert (decision.prefill_instance == "pl0") is holder, (wait_s, decision.reason)
        assert decision.reused_prefix_tokens == (len(hashes) * 64 if holder else 0)
