"""Simulated chips across two sites: layer arrival and decode steps follow the profiles; transfer overlaps prefill.

Times are the profiles' scaled by each gateway's ``TIME_SCALE``; prefill and decode instances
share ``MODEL`` and ``BYTE_SCALE`` (part sizes must agree on both sides).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from libs.common.messages import KvDestination, PrefillFinished, PrefillJob, prefill_status_decoder
from libs.engine.profiles import hardware_profile, model_profile
from libs.kvwire import KvReceiver, ReceiverConfig, TcpReceiverServer
from services.prefill_gateway.client import PrefillGatewayClient
from tests.gateways.conftest import caller_for

MODEL = "kimi-linear-1t"
BYTE_SCALE = 1e-2
DECODE_SCALE = 4.0  # decode steps of ~30-55 ms: scheduling noise stays a few percent of a step
PREFILL_INSTANCES = ",".join(f"sim-p{i}" for i in range(8))
LAYER_TOKENS = 16384
PACED_TOKENS = 8192
PROFILE = model_profile(MODEL)
PREFILL_S = {n: PROFILE.prefill_time_s(n, hardware_profile("h200")) for n in (LAYER_TOKENS, PACED_TOKENS)}
# A budget at which the paced prompt's transfer takes as long as its prefill (time scale 1).
PACED_GBPS = round(PROFILE.kv_bytes(PACED_TOKENS) * BYTE_SCALE * 8 / PREFILL_S[PACED_TOKENS] / 1e9, 4)


def _step_s(batch: int) -> float:
    return PROFILE.decode_step_s(batch, hardware_profile("h20")) * DECODE_SCALE


@pytest.fixture(scope="module")
def simulated(module_gateways):
    """Eight simulated H200 prefill instances in one process (unpaced), one paced to the decode site so the transfer
    takes as long as the prefill, one at half that budget, two H20 decode instances (one stepping 8 tokens at once)."""
    common = {"backend": "simulated:h200", "model": MODEL, "byte_scale": BYTE_SCALE, "time_scale": 1.0}
    decode = {
        "backend": "simulated:h20",
        "model": MODEL,
        "byte_scale": BYTE_SCALE,
        "time_scale": DECODE_SCALE,
        "kv_memory_bytes": 256 << 20,
    }

    async def start() -> None:
        await asyncio.gather(
            module_gateways.prefill("sim", PREFILL_INSTANCES, **common),
            module_gateways.prefill("sim-paced", "sim-paced-p0", budgets=f"dc-pd={PACED_GBPS}", **common),
            module_gateways.prefill("sim-slow", "sim-slow-p0", budgets=f"dc-pd={PACED_GBPS / 2}", **common),
            module_gateways.decode("sim-d0", **decode),
            module_gateways.decode("sim-d8", decode_chunk=8, **decode),
        )

    asyncio.run(start())
    return module_gateways


async def test_each_layer_arrives_when_the_profile_says_it_is_computed(simulated, sites):
    """Layer i reaches the receiver about (i+1)/n of the modelled prefill after the job starts, not at the end."""
    receiver = KvReceiver(ReceiverConfig(max_total_bytes=64 << 20, transfer_timeout_s=30))
    status = await sites.decode_nc.subscribe("test.sim.status")
    async with receiver, TcpReceiverServer(receiver) as server:
        host, port = server.address
        job = PrefillJob(
            request_id="layers",
            transfer_id="tlayers",
            model=MODEL,
            prompt_tokens=list(range(LAYER_TOKENS)),
            destination=KvDestination(site="dc-pd", instance="probe", host=host, port=port),
            status_subject="test.sim.status",
        )
        sent = time.monotonic()
        await PrefillGatewayClient(sites.decode_nc).submit("dc-prfaas", "sim", job)
        accepted = time.monotonic()
        first_seen: dict[int, float] = {}
        async with asyncio.timeout(20):
            while len(first_seen) < PROFILE.n_layers + 1:
                try:
                    held = receiver.assembly("tlayers").held()
                except Exception:  # not begun yet
                    held = []
                now = time.monotonic()
                for h in held:
                    first_seen.setdefault(h.part, now)
                await asyncio.sleep(0.002)  # socket threads fill the receiver: there is no event to await
        finished = prefill_status_decoder.decode((await status.next_msg(timeout=10)).data)
    assert isinstance(finished, PrefillFinished)
    layer_s = PREFILL_S[LAYER_TOKENS] / PROFILE.n_layers  # ~18 ms
    for layer in range(PROFILE.n_layers):
        arrived = first_seen[layer]
        # Never before the layer is computed; at most 0.3 s late on a loaded 2-core machine, which is far
        # less than the ~1.1 s prefill: layers held back until the end would fail the early ones.
        assert sent + (layer + 1) * layer_s * 0.99 <= arrived <= accepted + (layer + 1) * layer_s + 0.3, layer
    assert first_seen[0] - sent < 0.25 * PREFILL_S[LAYER_TOKENS]  # the transfer overlaps the prefill
    assert abs(finished.prefill_s - PREFILL_S[LAYER_TOKENS]) <= 0.3


async def test_decode_steps_follow_the_profile_and_batch(simulated, sites):
    """A request alone steps at step(1); eight together share steps of step(8), not eight times step(1)."""
    async with caller_for(sites, "sim") as caller:

        async def per_step(n_requests: int) -> float:
            prompts = [[i + 1] * 256 for i in range(n_requests)]
            outs = await asyncio.gather(*[caller.request(p, "sim-d0", model=MODEL, max_tokens=20) for p in prompts])
            return statistics.median((o.end_s - o.first_token_s) / 19 for o in outs)

        alone = await per_step(1)
        together = await per_step(8)
    # Sleeps never end early; 30% covers scheduling on a loaded machine and is far below the gap
    # between step(8) (~55 ms) and eight unbatched steps (~235 ms).
    assert _step_s(1) * 0.98 <= alone <= _step_s(1) * 1.3
    assert _step_s(8) * 0.98 <= together <= _step_s(8) * 1.3


async def test_a_chunked_decode_counts_its_tokens_not_its_messages(simulated, sites):
    """Up to eight steps per message: all 20 tokens arrive, and the final count says 20 (not the messages)."""
    async with caller_for(sites, "sim") as caller:
        out = await caller.request([9] * 256, "sim-d8", model=MODEL, max_tokens=20)
    assert len(out.tokens) == 20 and out.final.completion_tokens == 20


async def test_paced_transfer_is_hidden_behind_the_prefill(simulated, sites):
    """With the link paced so the transfer takes as long as the prefill, little of it is left after compute."""
    async with caller_for(sites, "sim-paced") as caller:
        out = await caller.request(list(range(PACED_TOKENS)), "sim-d0", model=MODEL, max_tokens=2)
    status = out.status
    assert isinstance(status, PrefillFinished)
    link_s = status.sent_bytes * 8 / (PACED_GBPS * 1e9)  # what the bytes take at the budget: ~ the prefill
    exposed = out.first_token_s - status.prefill_s - _step_s(1)
    # Without layer-wise overlap the exposed part would be the whole transfer (~0.7 s).
    assert exposed <= 0.5 * link_s


async def test_an_instance_computes_the_next_prefill_while_the_last_ones_kv_drains(simulated, sites):
    """On a link half as fast as the prefill, two prompts sent together: the second starts computing when the first's
    compute ends, not when its transfer does (an engine's compute is free while the KV drains from its memory)."""
    async with caller_for(sites, "sim-slow") as caller:
        first = asyncio.create_task(caller.request([1] * PACED_TOKENS, "sim-d0", model=MODEL, max_tokens=2))
        await asyncio.sleep(0.05)  # the first is accepted first (one instance: it computes first)
        second = await caller.request([2] * PACED_TOKENS, "sim-d0", model=MODEL, max_tokens=2)
        first = await first
    a, b = first.status, second.status
    assert isinstance(a, PrefillFinished) and isinstance(b, PrefillFinished)
    assert a.transfer_exposed_s > 0.3 * a.prefill_s  # the link left much of the first transfer after its compute
    # Waiting for the first's compute alone: its prefill less the 50 ms head start, plus scheduling.
    assert b.queue_s < a.prefill_s + 0.3 * a.transfer_exposed_s, (b.queue_s, a.prefill_s, a.transfer_exposed_s)
