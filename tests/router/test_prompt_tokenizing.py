"""The router's prompts to ids: long texts tokenized off the event loop, text and chat prompts through the prefix cache,
looked up in the index by the hashes of their ids."""

from __future__ import annotations

import asyncio
import time

import pytest

from libs.bench.hf_tokenizer import Prose, write_tokenizer
from libs.common.errors import ConfigError
from libs.common.hashing import hash_list
from libs.common.messages import BlocksStored, Sampling
from services.kv_index.client import KvIndexClient
from services.router.config import RouterConfig
from services.router.schemas import GenerationRequest
from tests.kv_index.conftest import Producer, eventually
from tests.router import tokenizers_trained as trained
from tests.router.conftest import PD, load, ready_router


@pytest.fixture(scope="module")
def bench_tokenizer(tmp_path_factory):
    """The benchmark's tokenizer.json (byte-level BPE trained on generated prose) and that prose."""
    prose = Prose()
    return write_tokenizer(tmp_path_factory.mktemp("bench-tok"), prose), prose


def text_request(text: str) -> GenerationRequest:
    """A completion request for ``text``."""
    return GenerationRequest("text", "reference", text, None, None, 16, Sampling(), False, False)


async def max_stall_s(work, period_s: float = 0.002) -> tuple[object, float, int]:
    """``work``'s result, the longest gap between ticks of a timer meanwhile, and how many ticks there were."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(period_s)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(period_s * 3)  # the ticker runs before the work starts
    try:
        result = await work
    finally:
        done.set()
        await task
    return result, max(gaps), len(gaps)


@pytest.mark.parametrize("cache_bytes", [64 << 20, 0])
async def test_a_long_prompt_does_not_stall_the_event_loop(start_router, bench_tokenizer, cache_bytes):
    """A ~200K-character prompt (the bench's 32K tokens) is tokenized while a 2 ms timer keeps ticking, cache on or off."""
    path, prose = bench_tokenizer
    svc = await start_router(tokenizer=str(path), token_cache_bytes=cache_bytes)
    ratios = []
    for seed in (7, 8, 9):  # the best of three fresh texts: a loaded 2-core host can deschedule the loop once
        text = prose.text(33_000, seed=seed)[:199_000]
        start = time.perf_counter()
        expected = svc.scheduler.tokenizer.encode(text, add_special=True)
        whole_s = time.perf_counter() - start  # the stall if it ran on the loop (measured under the same load)
        prompt, stall_s, ticks = await max_stall_s(svc.scheduler.prompt_ids(text_request(text)))
        assert prompt.ids == expected
        assert ticks >= 3  # the loop ran while the prompt was tokenized (whole_s is 50-150 ms here)
        ratios.append((stall_s, whole_s))
    # upper: a fifth of the tokenization: the worker holds the GIL only to build id lists (~1 ms per 32K tokens) and
    # Python switches threads every 5 ms; both sides of the ratio slow down together on a loaded machine
    assert any(stall < max(whole / 5, 0.012) for stall, whole in ratios), ratios


async def test_text_and_chat_prompts_reuse_their_prefix(start_router, tmp_path):
    """Text and chat prompts go through the prefix cache: the same ids as tokenizing whole, the shared part reused."""
    svc = await start_router(tokenizer=str(trained.gpt2_like(tmp_path / "tok")), token_cache_chunk_chars=64)
    sched, tok = svc.scheduler, svc.scheduler.tokenizer
    document = " ".join(trained.WORDS * 20)
    for question in ("what is cached?", "and what is not?"):
        text = f"{document} Question: {question}"
        prompt = await sched.prompt_ids(text_request(text))
        assert prompt.ids == tok.encode(text, add_special=True)
    assert sched.token_cache.plan(f"{document} Question: third", add_special=True).reused_chars > len(document) - 100
    messages = [{"role": "system", "content": document}, {"role": "user", "content": "hi there"}]
    chat = GenerationRequest("chat", "reference", None, None, messages, 16, Sampling(), False, False)
    prompt = await sched.prompt_ids(chat)
    rendered = sched.template.render(messages)
    assert prompt.ids == tok.encode(rendered, add_special=not tok.template_has_bos)
    assert sched.token_cache.plan(rendered, add_special=True).reused_chars > len(document) - 100


async def test_the_index_is_asked_with_the_hashes_of_the_whole_ids(start_router, nc, kv_index, tmp_path):
    """Prompts sharing a long start, the later ones through the first one's joined ids: the index, holding every block
    of each prompt under hash_list of its ids tokenized whole, finds them all."""
    holder = load("p-local", role="prefill")
    svc = await ready_router(
        start_router,
        nc,
        load("d0"),
        holder,
        tokenizer=str(trained.gpt2_like(tmp_path / "tok")),
        token_cache_chunk_chars=64,
        threshold_tokens=64,
    )
    sched, tok = svc.scheduler, svc.scheduler.tokenizer
    document = " ".join(trained.WORDS * 20)
    texts = [f"{document} Question {i}: where does it live?" for i in range(4)]
    hashes = [hash_list(tok.encode(text, add_special=True), 64) for text in texts]
    kinds = ("attn_kv", "linear_state")
    await Producer(nc, PD, holder.instance).send(*(BlocksStored(block_hashes=h, kind=k) for h in hashes for k in kinds))
    client = KvIndexClient(nc, timeout_s=2.0)

    async def stored() -> bool:
        return [(await client.lookup(h)).sites[0].usable_blocks for h in hashes] == list(map(len, hashes))

    await eventually(stored, what="the index holds every prompt's blocks")
    for i, text in enumerate(texts):
        if i:
            assert sched.token_cache.plan(text, add_special=True).prefix is not None  # the first one's start is used
        prepared = await sched.prepare(text_request(text), f"r{i}", None)
        assert prepared.index_status == "ok" and prepared.lookup.sites[0].usable_blocks == len(hashes[i])


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"ROUTER_TOKEN_CACHE_BYTES": "-1"}, "ROUTER_TOKEN_CACHE_BYTES='-1'"),
        ({"ROUTER_TOKEN_CACHE_CHUNK_CHARS": "0"}, "ROUTER_TOKEN_CACHE_CHUNK_CHARS='0'"),
        ({"ROUTER_TOKEN_CACHE_VERIFY_FRACTION": "1.5"}, "ROUTER_TOKEN_CACHE_VERIFY_FRACTION=1.5"),
        ({"ROUTER_TOKENIZE_THREAD_CHARS": "-5"}, "ROUTER_TOKENIZE_THREAD_CHARS='-5'"),
    ],
)
def test_cache_settings_name_their_key(env, key):
    """Token cache settings out of range are refused with the key and the value."""
    with pytest.raises(ConfigError, match=key):
        RouterConfig.from_env({"ROUTER_THRESHOLD_TOKENS": "100"} | env)


def test_cache_settings_are_read():
    """The token cache settings come from their ROUTER_ variables."""
    config = RouterConfig.from_env(
        {
            "ROUTER_THRESHOLD_TOKENS": "100",
            "ROUTER_TOKEN_CACHE_BYTES": "1000",
            "ROUTER_TOKEN_CACHE_CHUNK_CHARS": "300",
            "ROUTER_TOKEN_CACHE_VERIFY_FRACTION": "0.5",
            "ROUTER_TOKENIZE_THREAD_CHARS": "10",
        }
    )
    assert (config.token_cache_bytes, config.token_cache_chunk_chars) == (1000, 300)
    assert (config.token_cache_verify_fraction, config.tokenize_thread_chars) == (0.5, 10)
