"""End to end on two sites with reference gateways, driven with the official openai client."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import openai
import pytest
from opentelemetry import trace

from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.messages import (
    DecisionEvent,
    OutcomeEvent,
    analytics_event_decoder,
    instance_load_decoder,
)
from libs.engine.generate import generate
from libs.engine.model import ReferenceModel
from libs.engine.sampling import Sampling
from libs.engine.tokenizer import ByteTokenizer
from libs.engine.witness import LOGPROB_ATOL, WITNESS_STEPS, monolithic_logprobs
from services.router.chat_template import PLAIN_TEMPLATE, ChatTemplate
from services.router.tokenization import BytePromptTokenizer
from tests.kv_index.conftest import index_config, start_index
from tests.router.conftest import HTTP_TIMEOUT, reachable, router_starter
from tests.router.deployment import PD, PRFAAS, fleet

MODEL = ReferenceModel()
TOK = ByteTokenizer()
REMOTE, LOCAL, DECODE = "rt-p0", "rt-l0", "rt-d0"
LONG_TEXT = "Long context: the KV cache of a hybrid model is small enough to cross datacenters. " * 8
THRESHOLD = 512
WITNESS_TOKENS = 32  # generated past EOS (vLLM's ignore_eos), so a lost or misplaced state cannot hide
WITNESS = {"extra_body": {"ignore_eos": True}, "max_tokens": WITNESS_TOKENS, "temperature": 0}
PIECE = BytePromptTokenizer().token_piece


@pytest.fixture(scope="module")
def refs(supercluster, tmp_path_factory, otlp):
    """Reference gateways: PrfaaS prefill at dc-prfaas; local prefill and decode at dc-pd (all traced)."""
    receiver, _ = otlp
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    specs = [
        ("prefill_gateway", PRFAAS, REMOTE, {"cluster": "rt-prfaas"}),
        ("prefill_gateway", PD, LOCAL, {"cluster": "rt-pd"}),
        ("decode_gateway", PD, DECODE, {}),
    ]
    yield from fleet(supercluster, tmp_path_factory.mktemp("router-e2e"), specs, env)


@pytest.fixture
async def router(refs, supercluster, redis_url):
    """A router at dc-pd (static threshold t=512) with a KV index, both in this process."""
    _, close = await start_index(index_config(supercluster.url(PD), redis_url))
    try:
        async with router_starter(supercluster.url(PD)) as start:
            svc = await start(policy="static-threshold", threshold_tokens=THRESHOLD, token_timeout_s=10.0)
            await reachable(svc, supercluster, (REMOTE, LOCAL, DECODE))
            yield svc
    finally:
        await close()


@pytest.fixture
async def events(supercluster):
    """Decision and outcome events published at dc-pd, as they arrive."""
    nc = await connect(supercluster.url(PD), name="events")
    got: list = []

    async def keep(msg) -> None:
        got.append(analytics_event_decoder.decode(msg.data))

    await nc.subscribe(subjects.decisions(PD), cb=keep)
    await nc.subscribe(subjects.outcomes(PD), cb=keep)
    await settle(nc)
    try:
        yield got
    finally:
        await nc.close()


def api(svc) -> openai.AsyncOpenAI:
    """The official client, pointed at the router."""
    return openai.AsyncOpenAI(base_url=svc.url + "/v1", api_key="unused", max_retries=0, timeout=60.0)


def expected_text(prompt_ids: list[int], max_tokens: int, *, ignore_eos: bool = False) -> str:
    """What monolithic generation gives for the same prompt (greedy)."""
    return TOK.decode(generate(MODEL, prompt_ids, max_tokens, Sampling(ignore_eos=ignore_eos)))


def assert_logprobs_match(
    tokens: list[str], logprobs: list[float], top: list[dict[str, float]], prompt_ids: list[int]
) -> None:
    """The first steps' log probabilities (chosen token and alternatives) are monolithic generation's within 1e-4."""
    for i, want in enumerate(monolithic_logprobs(MODEL, prompt_ids)):
        assert tokens[i] == PIECE(want.token_id)[0]
        assert abs(logprobs[i] - want.logprob) <= LOGPROB_ATOL, (i, logprobs[i], want.logprob)
        for token_id, lp in zip(want.top_ids, want.top_logprobs, strict=True):
            assert abs(top[i][PIECE(token_id)[0]] - lp) <= LOGPROB_ATOL, (i, token_id)


def assert_chat_logprobs_match(content: list, prompt_ids: list[int]) -> None:
    """``assert_logprobs_match`` on a chat choice's ``logprobs.content``."""
    assert len(content) >= WITNESS_STEPS
    top = [{alt.token: alt.logprob for alt in c.top_logprobs} for c in content]
    assert_logprobs_match([c.token for c in content], [c.logprob for c in content], top, prompt_ids)


def chat_ids(content: str) -> list[int]:
    """The prompt tokens the router makes of one user message (plain template, BOS first)."""
    return TOK.encode(ChatTemplate(PLAIN_TEMPLATE).render([{"role": "user", "content": content}]))


async def for_request(got: list, request_id: str, kind: type, timeout_s: float = 10.0) -> list:
    """Events of ``kind`` about ``request_id`` (waits for at least one)."""
    async with asyncio.timeout(timeout_s):
        while True:
            found = [e for e in got if isinstance(e, kind) and e.request_id == request_id]
            if found:
                return found
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_completion_matches_monolithic_generation(router, stream):
    """Chat, streamed or not: the text of monolithic generation, usage, finish_reason, the request id header."""
    client = api(router)
    messages = [{"role": "user", "content": "Tell me about prefill."}]
    ids = chat_ids(messages[0]["content"])
    want = expected_text(ids, WITNESS_TOKENS, ignore_eos=True)
    if not stream:
        raw = await client.chat.completions.with_raw_response.create(
            model="reference", messages=messages, logprobs=True, top_logprobs=20, **WITNESS
        )
        out = raw.parse()
        assert raw.headers["x-prfaas-request-id"] and out.id == "chatcmpl-" + raw.headers["x-prfaas-request-id"]
        assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == want and out.choices[0].finish_reason == "length"
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), WITNESS_TOKENS)
        assert len(out.choices[0].logprobs.content) == WITNESS_TOKENS
        assert_chat_logprobs_match(out.choices[0].logprobs.content, ids)
        return
    chunks = [
        c
        async for c in await client.chat.completions.create(
            model="reference",
            messages=messages,
            stream=True,
            logprobs=True,
            top_logprobs=20,
            stream_options={"include_usage": True},
            **WITNESS,
        )
    ]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == WITNESS_TOKENS
    assert all(c.usage is None for c in chunks[:-1])
    content = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(content) == WITNESS_TOKENS
    assert_chat_logprobs_match(content, ids)


@pytest.mark.parametrize("stream", [False, True])
async def test_text_completion_with_token_ids_and_stop(router, stream):
    """A token-id prompt; ``stop`` cuts the text before the stop sequence and finishes with 'stop'."""
    prompt = TOK.encode("The decode site streams tokens back. ")
    full = expected_text(prompt, 24)
    stop = full[8:10]
    want = full[: full.index(stop)]
    client = api(router)
    if stream:
        chunks = [
            c
            async for c in await client.completions.create(
                model="reference", prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=True
            )
        ]
        assert "".join(c.choices[0].text for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop" and chunks[0].object == "text_completion"
    else:
        out = await client.completions.create(model="reference", prompt=prompt, max_tokens=24, temperature=0, stop=stop)
        assert out.choices[0].text == want and out.choices[0].finish_reason == "stop"
        assert out.id.startswith("cmpl-") and out.usage.prompt_tokens == len(prompt)
    short = await client.completions.create(model="reference", prompt=TOK.decode(prompt), max_tokens=5, temperature=0)
    assert short.choices[0].text == full[:5] and short.choices[0].finish_reason == "length"


async def test_long_prompt_offloaded_short_local(router, events):
    """The decision events say the long prompt was prefilled at the PrfaaS site and the short one locally."""
    client = api(router)
    long = await client.completions.with_raw_response.create(
        model="reference", prompt=LONG_TEXT, logprobs=20, **WITNESS
    )
    short = await client.completions.with_raw_response.create(
        model="reference", prompt="Hi", max_tokens=4, temperature=0
    )
    choice = long.parse().choices[0]
    assert choice.text == expected_text(TOK.encode(LONG_TEXT), WITNESS_TOKENS, ignore_eos=True)
    lp = choice.logprobs
    assert len(lp.tokens) == WITNESS_TOKENS and lp.text_offset[:2] == [0, len(lp.tokens[0])]
    assert_logprobs_match(lp.tokens, lp.token_logprobs, lp.top_logprobs, TOK.encode(LONG_TEXT))
    [d_long] = await for_request(events, long.headers["x-prfaas-request-id"], DecisionEvent)
    [d_short] = await for_request(events, short.headers["x-prfaas-request-id"], DecisionEvent)
    assert (d_long.route, d_long.decision.prefill_instance, d_long.decision.decode_instance) == (
        "remote",
        REMOTE,
        DECODE,
    )
    assert d_long.incremental_tokens > THRESHOLD and d_long.decision.transport == "tcp"
    assert (d_short.route, d_short.decision.prefill_instance) == ("local", LOCAL)
    [o_long] = await for_request(events, long.headers["x-prfaas-request-id"], OutcomeEvent)
    assert o_long.status == "ok" and o_long.route == "remote" and o_long.bytes_moved > 0
    assert o_long.ttft_s > 0 and o_long.prefill_s is not None and o_long.completion_tokens == WITNESS_TOKENS
    assert 0 < o_long.first_step_s < o_long.ttft_s  # the decode side: a complete state to its first token


async def test_repeated_long_prefix_is_a_cache_hit(router, events):
    """A second prompt sharing a long prefix finds it cached (index) and reuses it at the prefill instance."""
    client = api(router)
    first = LONG_TEXT + "First question?"
    await client.completions.create(model="reference", prompt=first, max_tokens=2, temperature=0)
    body = {"model": "reference", "prompt": LONG_TEXT + "Second question?"}

    async def cached() -> int:
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            async with http.post(router.url + "/v1/route/explain", json=body) as r:
                return msgspec.json.decode(await r.read(), type=DecisionEvent).cached_tokens.get(PRFAAS, 0)

    async with asyncio.timeout(10):
        while True:
            if await cached() > 0:
                break
            await asyncio.sleep(0.1)
    raw = await client.completions.with_raw_response.create(logprobs=20, **WITNESS, **body)
    request_id = raw.headers["x-prfaas-request-id"]
    [decision] = await for_request(events, request_id, DecisionEvent)
    assert decision.cached_tokens[PRFAAS] >= len(LONG_TEXT) // 64 * 64 - 64
    assert decision.decision.reused_prefix_tokens == decision.cached_tokens[PRFAAS]
    [outcome] = await for_request(events, request_id, OutcomeEvent)
    assert outcome.cached_tokens >= decision.cached_tokens[PRFAAS]
    prompt_ids = TOK.encode(body["prompt"])
    choice = raw.parse().choices[0]
    assert choice.text == expected_text(prompt_ids, WITNESS_TOKENS, ignore_eos=True)
    assert_logprobs_match(
        choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs, prompt_ids
    )


async def test_client_disconnect_cancels_the_gateways_work(router, events, supercluster):
    """Closing a stream mid-way cancels the decode job: its slot frees long before max_tokens would end it."""
    nc = await connect(supercluster.url(PD), name="watch")
    try:
        body = {
            "model": "reference",
            "prompt": "Stream a long answer.",
            "max_tokens": 4000,
            "temperature": 0.7,
            "seed": 1,
            "stream": True,
        }
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            async with http.post(router.url + "/v1/completions", json=body) as r:
                request_id = r.headers["x-prfaas-request-id"]
                await r.content.readline()  # the first chunk: decoding is under way
        closed_at = time.monotonic()
        [outcome] = await for_request(events, request_id, OutcomeEvent)
        assert outcome.status == "cancelled"
        sub = await nc.subscribe(subjects.load(PD, DECODE))
        async with asyncio.timeout(5):  # 4,000 tokens at ~5 ms a step would keep the slot ~20 s
            while True:
                load = instance_load_decoder.decode((await sub.next_msg(timeout=5)).data)
                if load.ts > closed_at and load.decode_active == 0 and load.reserved == 0:
                    break
    finally:
        await nc.close()


async def test_one_trace_per_request_across_the_hops(router, otlp):
    """The router's request span and the gateways' spans (reservation, prefill with its transfer, decode) share a trace."""
    receiver, provider = otlp
    await asyncio.to_thread(provider.force_flush)
    receiver.take()
    await api(router).completions.create(model="reference", prompt=LONG_TEXT, max_tokens=2, temperature=0)
    want = {
        "router.request",
        "router.decide",
        "router.decode_job",
        "router.prefill_job",
        "decode_gateway.reserve",
        "decode_gateway.job",
        "prefill_gateway.accept",
        "prefill_gateway.job",
    }
    spans = []
    async with asyncio.timeout(10):
        while True:
            await asyncio.to_thread(provider.force_flush)
            spans += receiver.take()
            roots = [s for s in spans if s.name == "router.request"]
            if roots and want <= {s.name for s in spans if s.trace_id == roots[0].trace_id}:
                break
            await asyncio.sleep(0.1)
    assert len({s.trace_id for s in spans if s.name == "router.request"}) == 1
    services = {s.service for s in spans if s.trace_id == roots[0].trace_id}
    assert {"prefill_gateway", "decode_gateway"} <= services, services
    assert trace.get_current_span() is trace.INVALID_SPAN
