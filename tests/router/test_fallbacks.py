"""No accepted request is lost: every failure before the first token is re-decided, after it the stream says so."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.router.deployment import PD, PRFAAS
from tests.router.test_end_to_end import TOK, WITNESS, WITNESS_TOKENS, api, assert_logprobs_match, expected_text

PROMPT = "Fallbacks keep every accepted request alive across sites. " * 6  # ~370 tokens


async def _complete(svc, i: int) -> tuple[str, str]:
    """32 tokens past EOS of a distinct prompt, and monolithic generation's; its first steps' log probabilities checked.

    The monolithic run goes to a thread: on this event loop it would stall the router's, which serves the requests.
    """
    prompt = f"[{i}] {PROMPT}"
    out = await api(svc).completions.create(model="reference", prompt=prompt, logprobs=20, **WITNESS)
    lp = out.choices[0].logprobs
    await asyncio.to_thread(assert_logprobs_match, lp.tokens, lp.token_logprobs, lp.top_logprobs, TOK.encode(prompt))
    return out.choices[0].text, await asyncio.to_thread(
        expected_text, TOK.encode(prompt), WITNESS_TOKENS, ignore_eos=True
    )


async def test_refused_remote_prefill_falls_back_to_local(fleet, routed):
    """A PrfaaS instance that refuses (queue full) sends the request to local prefill, with a fallback decision."""
    await fleet.start_async(
        ("prefill_gateway", PRFAAS, "fb-p0", {"cluster": "fb-prfaas", "queue_limit": 1}),
        ("prefill_gateway", PD, "fb-l0", {"cluster": "fb-pd"}),
        ("decode_gateway", PD, "fb-d0", {}),
    )
    svc, decisions = await routed(("fb-p0", "fb-l0", "fb-d0"))
    results = await asyncio.gather(*(_complete(svc, i) for i in range(6)))
    assert all(got == want for got, want in results)
    fallbacks = [d for d in decisions if d.route == "fallback"]
    refused = [d for d in fallbacks if "fb-p0 refused: no_capacity" in d.decision.fallback_of]
    assert refused and all(d.decision.prefill_instance == "fb-l0" for d in refused)


async def test_killed_remote_prefill_under_load_loses_no_request(fleet, routed):
    """kill -9 of the PrfaaS prefill gateway mid-load: every request still ends in the right tokens."""
    await fleet.start_async(
        ("prefill_gateway", PRFAAS, "kl-p0", {"cluster": "kl-prfaas"}),
        ("prefill_gateway", PD, "kl-l0", {"cluster": "kl-pd"}),
        ("decode_gateway", PD, "kl-d0", {}),
    )
    svc, decisions = await routed(("kl-p0", "kl-l0", "kl-d0"))
    first = [asyncio.ensure_future(_complete(svc, i)) for i in range(8)]
    async with asyncio.timeout(30):
        while True:
            if decisions:
                break
            await asyncio.sleep(0.005)
    fleet.procs["kl-p0"].kill()
    second = [asyncio.ensure_future(_complete(svc, i)) for i in range(8, 16)]  # routed while it still looks alive
    results = await asyncio.gather(*first, *second)
    assert all(got == want for got, want in results)
    fallbacks = [d for d in decisions if d.route == "fallback"]
    assert fallbacks and all(d.decision.prefill_instance == "kl-l0" and d.decision.fallback_of for d in fallbacks)


async def test_dead_decode_instance_is_replaced_before_the_first_token(fleet, routed):
    """A decode instance that died (still in the view) is replaced by another one; the request completes."""
    await fleet.start_async(
        ("prefill_gateway", PD, "dd-l0", {"cluster": "dd-pd"}),
        ("decode_gateway", PD, "dd-d0", {}),
        ("decode_gateway", PD, "dd-d1", {}),
    )
    svc, decisions = await routed(("dd-l0", "dd-d0", "dd-d1"), instance_ttl_s=30.0)
    fleet.procs["dd-d1"].kill()
    results = [await _complete(svc, i) for i in range(8)]
    assert all(got == want for got, want in results)
    retried = [d for d in decisions if d.route == "fallback"]
    assert retried and all(d.decision.decode_instance == "dd-d0" and "dd-d1" in d.decision.fallback_of for d in retried)


async def test_decode_failure_after_tokens_ends_the_stream_with_an_error(fleet, routed):
    """Once tokens were streamed, a dead decode instance ends the stream with an error event, not a silent close."""
    await fleet.start_async(("prefill_gateway", PD, "mf-l0", {"cluster": "mf-pd"}), ("decode_gateway", PD, "mf-d0", {}))
    svc, _ = await routed(("mf-l0", "mf-d0"))
    stream = await api(svc).completions.create(
        model="reference", prompt="Keep talking.", max_tokens=4000, temperature=0.7, seed=3, stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="decode instance mf-d0"):
        async for chunk in stream:
            received.append(chunk)
            if len(received) == 1:
                fleet.procs["mf-d0"].kill()
    assert received


async def test_queued_remote_job_outlives_the_default_lease(fleet, routed):
    """Jobs queued behind others at their prefill instance keep their reservations: the lease covers the predicted wait.

    The decode gateway's own lease (0.3 s) would expire while the third and fourth jobs wait ~0.8 and
    ~1.2 s for a simulated H200 busy with ~0.4 s prefills; the router's lease is twice the predicted wait.
    """
    sim = {"backend": "simulated:h200", "model": "kimi-linear-1t", "byte_scale": 0.001}
    await fleet.start_async(
        ("prefill_gateway", PRFAAS, "ls-p0", {"cluster": "ls-prfaas"} | sim),
        ("decode_gateway", PD, "ls-d0", sim | {"backend": "simulated:h20", "lease_s": 0.3}),
    )
    svc, decisions = await routed(("ls-p0", "ls-d0"), lease_min_s=0.3)
    client = api(svc)
    outs = await asyncio.gather(
        *(client.completions.create(model="kimi-linear-1t", prompt=[i + 1] * 1024, max_tokens=3) for i in range(4))
    )
    assert [o.usage.completion_tokens for o in outs] == [3, 3, 3, 3]
    assert len(decisions) == 4 and all(d.route == "remote" and d.attempt == 0 for d in decisions)
    assert max(d.decision.predicted_queue_s for d in decisions) > 0.6  # the router saw the queue it covered
