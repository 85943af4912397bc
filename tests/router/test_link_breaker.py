"""A router over real gateways whose KV path to the decode site crosses a link relay: cut it, and the breaker opens.

The PrfaaS site's heartbeats keep arriving (NATS does not cross this relay): only the transfers fail. After two
remote attempts failed on the link, the next request is decided local at once, its reason naming the open link; the
router's ``/metrics`` shows the pair open. Once the link is back, after the hold one request probes it and goes
remote; its KV closes the breaker. No request decided after the link opened pays a failed attempt.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import openai

from libs.bench.wan import LinkRelay
from libs.common import subjects
from libs.common.bus import connect
from libs.common.messages import encode
from libs.lab.servers import free_port
from libs.lab.wan_server import change_link
from tests.router.conftest import load
from tests.router.deployment import PD, PRFAAS

PROMPT = "A link that fails is left alone until it works again. " * 5  # ~280 tokens: remote at threshold 0
METRIC = f'prfaas_router_link_breaker{{dst_site="{PD}",src_site="{PRFAAS}"}}'


def _api(svc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=svc.url + "/v1", api_key="unused", max_retries=0, timeout=60.0)


async def _one(svc, decisions: list, i: int) -> list:
    """One request to its end; its decision events (attempt 0 first)."""
    out = await _api(svc).completions.create(model="reference", prompt=f"[{i}] {PROMPT}", max_tokens=4)
    assert out.choices[0].text is not None
    request_id = out.id.removeprefix("cmpl-")
    return [d for d in decisions if d.request_id == request_id]


async def _breaker_metric(svc) -> float:
    async with aiohttp.ClientSession() as http, http.get(svc.url + "/metrics") as resp:
        text = await resp.text()
    [line] = [line for line in text.splitlines() if line.startswith(METRIC)]
    return float(line.split()[-1])


async def test_failing_transfers_open_the_link_and_a_probe_closes_it_once_it_works(fleet, routed):
    """Cut: two fallbacks, then local at once with the link named; restored: a probe goes remote and closes it."""
    receiver_port = free_port()
    with LinkRelay(receiver_port, gbps=None, rtt_ms=0.0) as relay:
        await fleet.start_async(
            ("prefill_gateway", PRFAAS, "lb-p0", {"cluster": "lb-prfaas"}),
            ("prefill_gateway", PD, "lb-l0", {"cluster": "lb-pd"}),
            (
                "decode_gateway",
                PD,
                "lb-d0",
                {"tcp_port": receiver_port, "advertise_by_site": f"{PRFAAS}=127.0.0.1:{relay.port}"},
            ),
        )
        # A lease of 1 s: a transfer held by the cut link fails in about a second, not the default ten.
        svc, decisions = await routed(("lb-p0", "lb-l0", "lb-d0"), lease_min_s=1.0, lease_margin=1.0)
        first = await _one(svc, decisions, 0)
        assert [d.route for d in first] == ["remote"]
        assert await _breaker_metric(svc) == 0.0

        await asyncio.to_thread(change_link, relay.control_url, {"up": False, "reset": True})
        for i in (1, 2):
            paid = await _one(svc, decisions, i)
            assert [d.route for d in paid] == ["remote", "fallback"], [d.decision.reason for d in paid]
            assert "transfer_failed" in paid[1].decision.fallback_of
        [kept] = await _one(svc, decisions, 3)
        assert kept.route == "local" and kept.decision.prefill_instance == "lb-l0"
        assert f"link {PRFAAS}->{PD} open since " in kept.decision.reason
        assert "2 transfers failed in" in kept.decision.reason
        assert await _breaker_metric(svc) == 2.0

        await asyncio.to_thread(change_link, relay.control_url, {"up": True})
        for i in range(4, 40):  # the hold is 2 s; a local request here takes ~0.1 s
            after = await _one(svc, decisions, i)
            assert len(after) == 1, [d.decision.reason for d in after]  # no failed attempt once the link opened
            if after[0].route == "remote":
                break
            assert "link " in after[0].decision.reason
        else:
            raise AssertionError("no request went remote again once the link was back")
        assert await _breaker_metric(svc) == 0.0
        again = await _one(svc, decisions, 99)
        assert [d.route for d in again] == ["remote"]


async def test_remote_prefill_jobs_nobody_answers_open_the_link(fleet, routed, supercluster):
    """A PrfaaS instance that heartbeats but whose jobs go unanswered (no responders): two fallbacks, then local at once."""
    await fleet.start_async(
        ("prefill_gateway", PD, "lu-l0", {"cluster": "lu-pd"}),
        ("decode_gateway", PD, "lu-d0", {}),
    )
    nc = await connect(supercluster.url(PRFAAS), name="ghost")
    beating = asyncio.create_task(_heartbeats(nc, load("lu-ghost", role="prefill", site=PRFAAS, cluster="lu-ghost")))
    try:
        svc, decisions = await routed(("lu-ghost", "lu-l0", "lu-d0"))
        for i in (0, 1):
            paid = await _one(svc, decisions, i)
            assert [d.route for d in paid] == ["remote", "fallback"], [d.decision.reason for d in paid]
        [kept] = await _one(svc, decisions, 2)
        assert kept.route == "local" and f"link {PRFAAS}->{PD} open since " in kept.decision.reason
        assert "prefill job unanswered" in kept.decision.reason
    finally:
        beating.cancel()
        await nc.close()


async def _heartbeats(nc, beat) -> None:
    """``beat`` every 0.1 s, freshly stamped, until cancelled."""
    while True:
        await nc.publish(subjects.load(beat.site, beat.instance), encode(msgspec.structs.replace(beat, ts=time.time())))
        await asyncio.sleep(0.1)


async def test_refusals_of_a_full_prfaas_queue_leave_the_link_closed(fleet, routed):
    """Queue full (no_capacity) is the instance's answer, not the link's: after several refusals the link stays closed."""
    await fleet.start_async(
        ("prefill_gateway", PRFAAS, "lr-p0", {"cluster": "lr-prfaas", "queue_limit": 1}),
        ("prefill_gateway", PD, "lr-l0", {"cluster": "lr-pd"}),
        ("decode_gateway", PD, "lr-d0", {}),
    )
    svc, decisions = await routed(("lr-p0", "lr-l0", "lr-d0"))
    await asyncio.gather(*(_one(svc, decisions, i) for i in range(6)))
    refused = [d for d in decisions if d.route == "fallback" and "refused: no_capacity" in d.decision.fallback_of]
    assert len(refused) >= 2, [d.decision.reason for d in decisions]
    assert await _breaker_metric(svc) == 0.0
    assert [d.route for d in await _one(svc, decisions, 6)] == ["remote"]
