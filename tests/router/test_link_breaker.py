"""A router over real gateways whose KV path to the decode site crosses a link relay: cut it, and the breaker opens.

The PrfaaS site's heartbeats keep arriving (NATS does not cross this relay): only the transfers fail. After two
remote attempts failed on the link, the next request is decided local at once, its reason naming the open link; the
router's ``/metrics`` shows the pair open. Once the link is back, after the hold one request probes it and goes
remote; its KV closes the breaker. No request decided after the link opened pays a failed attempt.
"""

from __future__ import annotations

import asyncio

import aiohttp
import openai

from libs.bench.wan import LinkRelay
from libs.lab.servers import free_port
from libs.lab.wan_server import change_link
from tests.router.deployment import PD, PRFAAS

PROMPT = "A link that fails is left alone until it works again. " * 5  # ~280 tokens: remote at threshold 0
METRIC = f'prfaas_router_link_breaker{{dst_site="{PD}",src_site="{PRFAAS}"}}'


def _api(svc) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=svc.url + "/v1", api_key="unused", max_retries=0, timeout=60.0)


async def _one(svc, decisions: list, i: int) -> list:
    """One request to its end; its decision events (attempt 0 first)."""
    before = len(decisions)
    out = await _api(svc).completions.create(model="reference", prompt=f"[{i}] {PROMPT}", max_tokens=4)
    assert out.choices[0].text is not None
    request_id = decisions[before].request_id
    return [d for d in decisions[before:] if d.request_id == request_id]


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
