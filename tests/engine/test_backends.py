"""ReferenceBackend: layer-wise async prefill, cache reuse and KV events, batched async decode."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from libs.common.errors import BadRequest, NoCapacity
from libs.common.hashing import hash_list
from libs.common.messages import BlocksEvicted, BlocksStored
from libs.engine.backends import ReferenceBackend
from libs.engine.generate import generate
from libs.engine.model import ReferenceModel
from libs.engine.sampling import Sampling
from libs.engine.tokenizer import ByteTokenizer

PROMPT = ByteTokenizer().encode("Layer-wise prefill streams KV across datacenters. " * 7)  # 358 tokens, 5 blocks
GREEDY = Sampling(ignore_eos=True)


class _RecordingModel(ReferenceModel):
    """The reference model, remembering how many cached tokens each prefill started from."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix_tokens: list[int] = []

    def prefill(self, tokens, prefix_state=None):
        self.prefix_tokens.append(0 if prefix_state is None else prefix_state.n_tokens)
        return super().prefill(tokens, prefix_state)


async def _prefill(backend: ReferenceBackend, tokens: list[int], **kw) -> list[list]:
    return [parts async for parts in backend.prefill("req", tokens, **kw)]


async def _decode(backend: ReferenceBackend, rid: str, parts, n: int, sampling: Sampling = GREEDY) -> list[int]:
    return [t async for out in backend.decode(rid, parts, n, sampling) for t in out.token_ids]


async def test_prefill_streams_layers_then_head_and_decodes_like_the_model() -> None:
    """Prefill yields one part list per layer in order, the head last; decode reproduces generate()."""
    async with ReferenceBackend() as backend:
        layers = await _prefill(backend, PROMPT)
        assert [parts[0].layer for parts in layers] == list(range(backend.config.n_layers + 1))
        parts = [p for layer in layers for p in layer]
        assert [p.key for p in parts] == [s.key for s in backend.plan_parts(len(PROMPT))]
        tokens = await _decode(backend, "req", parts, 20)
        assert tokens == generate(backend.model, PROMPT, 20, GREEDY)


async def test_prefill_reports_blocks_and_resumes_from_them() -> None:
    """A prefill stores its full blocks (both kinds, chained hashes); a longer prompt resumes after them."""
    model = _RecordingModel()
    async with ReferenceBackend(model) as backend:
        await _prefill(backend, PROMPT)
        hashes = hash_list(PROMPT)
        assert backend.cache.drain_events() == [
            BlocksStored(block_hashes=hashes, kind="attn_kv", parent_hash=None),
            BlocksStored(block_hashes=hashes, kind="linear_state", parent_hash=None),
        ]
        longer = PROMPT + ByteTokenizer().encode(" And then some more text to read.", bos=False)
        resumed = [p for layer in await _prefill(backend, longer) for p in layer]
        assert model.prefix_tokens == [0, len(hashes) * 64]
        fresh = model.prefill_state(longer)
        logits = resumed[-1].array
        assert np.abs(logits - fresh.logits).max() / np.abs(fresh.logits).max() <= 1e-4
        assert await _decode(backend, "r2", resumed, 12) == generate(model, longer, 12, GREEDY)
        await _prefill(backend, longer, use_cache=False)
        assert model.prefix_tokens[-1] == 0


async def test_whole_prompt_cached_still_computes_the_last_block() -> None:
    """When every block is cached, prefill resumes one block earlier so it can produce logits."""
    model = _RecordingModel()
    prompt = PROMPT[:320]  # exactly 5 blocks
    async with ReferenceBackend(model) as backend:
        await _prefill(backend, prompt)
        await _prefill(backend, prompt)
        assert model.prefix_tokens == [0, 256]


async def test_cache_capacity_evicts_and_reports() -> None:
    """A cache smaller than two prompts' blocks evicts the older one and reports it."""
    cfg = ReferenceModel().config
    block_bytes = cfg.attn_kv_bytes_per_token * cfg.block_size + cfg.linear_state_bytes
    async with ReferenceBackend(cache_capacity_bytes=6 * block_bytes) as backend:
        await _prefill(backend, PROMPT)
        backend.cache.drain_events()
        other = ByteTokenizer().encode("A different prompt shares nothing with the first. " * 7)
        await _prefill(backend, other)
        events = backend.cache.drain_events()
        evicted = {h for e in events if isinstance(e, BlocksEvicted) for h in e.block_hashes}
        assert evicted and evicted <= set(hash_list(PROMPT))
        assert backend.cache.used_bytes <= 6 * block_bytes


async def test_concurrent_decodes_share_steps() -> None:
    """Requests decoding at the same time step together and each gets the tokens it gets alone."""
    async with ReferenceBackend() as backend:
        prompts = [PROMPT, PROMPT[:100], ByteTokenizer().encode("short")]
        states = [[p for layer in await _prefill(backend, pr) for p in layer] for pr in prompts]
        samplings = [GREEDY, Sampling(temperature=0.7, seed=9, ignore_eos=True), GREEDY]
        got = await asyncio.gather(*[_decode(backend, str(i), states[i], 16, samplings[i]) for i in range(3)])
        assert backend._decoder.steps == 16  # one batched step per token, not 48
        assert got == [generate(backend.model, pr, 16, s) for pr, s in zip(prompts, samplings, strict=True)]


async def test_requests_beyond_max_batch_wait_for_a_slot() -> None:
    """With max_batch 2, a third request waits, then joins when a slot frees; all finish correctly."""
    async with ReferenceBackend(max_batch=2) as backend:
        parts = [p for layer in await _prefill(backend, PROMPT) for p in layer]
        tasks = [asyncio.create_task(_decode(backend, str(i), parts, n)) for i, n in enumerate((4, 30, 8))]
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        load = backend.load()
        assert (load.decode_active + load.decode_waiting, load.free_decode_slots) == (3, 0)
        got = await asyncio.gather(*tasks)
        alone = generate(backend.model, PROMPT, 30, GREEDY)
        assert got == [alone[:4], alone, alone[:8]]
        assert backend.load().decode_active == 0


async def test_leaving_early_frees_the_slot() -> None:
    """A consumer that stops iterating leaves the batch; the loop ends when nobody is left."""
    async with ReferenceBackend() as backend:
        parts = [p for layer in await _prefill(backend, PROMPT) for p in layer]
        stream = backend.decode("r", parts, 1000, GREEDY)
        first = await anext(stream)
        await stream.aclose()
        assert len(first.token_ids) == 1
        for _ in range(100):
            if backend._decoder._task is None or backend._decoder._task.done():
                break
            await asyncio.sleep(0.01)
        assert backend.load().decode_active == 0


async def test_close_ends_waiting_requests_with_an_error() -> None:
    """Closing the backend while a request decodes ends it with NoCapacity rather than silence."""
    backend = ReferenceBackend()
    parts = [p for layer in await _prefill(backend, PROMPT) for p in layer]
    stream = backend.decode("r", parts, 1000, GREEDY)
    await anext(stream)
    await backend.close()
    with pytest.raises(NoCapacity):
        async for _ in stream:
            pass
    await backend.close()  # idempotent


async def test_bad_prompt_is_a_bad_request() -> None:
    """An out-of-vocabulary prompt fails the prefill iteration with BadRequest."""
    async with ReferenceBackend() as backend:
        with pytest.raises(BadRequest):
            await _prefill(backend, [1, 2, 100_000])
        with pytest.raises(BadRequest):
            await _decode(backend, "r", [], 4)


async def test_blocks_are_cached_by_the_time_the_head_arrives() -> None:
    """A consumer that stops right after the head part still leaves the prompt's blocks cached."""
    async with ReferenceBackend() as backend:
        stream = backend.prefill("r", PROMPT)
        async for parts in stream:
            if parts[0].layer == backend.config.n_layers:
                break
        await stream.aclose()
        assert backend.cache.usable_blocks(hash_list(PROMPT)) == len(PROMPT) // 64


async def test_decode_side_restores_from_a_pinned_prefix_plus_the_missing_blocks() -> None:
    """Parts sent without the blocks a decode instance holds, joined to its pinned prefix, decode like generate()."""
    first = PROMPT[:200]
    second = PROMPT[:192] + ByteTokenizer().encode(" a different ending of this prompt", bos=False)
    async with ReferenceBackend() as prefill, ReferenceBackend() as decode:
        parts = [p for layer in await _prefill(prefill, first) for p in layer]
        restored = await decode.restore("r1", parts)
        assert restored.stored_blocks == 3  # the whole blocks of the first prompt join the decode cache
        assert [e for e in decode.cache.drain_events()] == [
            BlocksStored(block_hashes=hash_list(first)[:3], kind="attn_kv", parent_hash=None)
        ]
        hashes = hash_list(second)
        held = decode.cache.leading_blocks("attn_kv", hashes)
        assert held == 3 and decode.cache.usable_blocks(hashes) == 0  # attn_kv only: no linear checkpoint
        decode.cache.pin("attn_kv", hashes[:held])
        specs = prefill.plan_parts(len(second), skip_blocks=held)
        trimmed = [p for layer in await _prefill(prefill, second, skip_blocks=held) for p in layer]
        assert [(p.key, p.array.shape) for p in trimmed] == [(s.key, s.shape) for s in specs]
        kv = [p for p in trimmed if p.name == "k"]
        assert kv and all(p.array.shape[0] == len(second) - 192 for p in kv)
        restored = await decode.restore("r2", trimmed, held_blocks=held)
        assert restored.stored_blocks == len(hashes) - held
        tokens = [t async for out in decode.decode_restored(restored, 24, GREEDY) for t in out.token_ids]
        assert tokens == generate(decode.model, second, 24, GREEDY)


async def test_restore_refuses_parts_that_do_not_fit_the_held_prefix() -> None:
    """Parts trimmed for a prefix the instance does not hold, or of the wrong size, are BadRequest."""
    async with ReferenceBackend() as backend:
        trimmed = [p for layer in await _prefill(backend, PROMPT, skip_blocks=2) for p in layer]
        async with ReferenceBackend() as empty:
            with pytest.raises(BadRequest, match="not held"):
                await empty.restore("r", trimmed, held_blocks=2)
            with pytest.raises(BadRequest, match="shape"):
                await empty.restore("r", trimmed, held_blocks=1)
        with pytest.raises(BadRequest, match="skip_blocks"):
            backend.plan_parts(128, skip_blocks=2)  # the last token's K/V is always sent


async def test_prompt_over_the_model_limit_is_a_bad_request() -> None:
    """A prompt longer than max_prompt_tokens is refused before any compute."""
    async with ReferenceBackend() as backend:
        too_long = [65] * (backend.max_prompt_tokens + 1)
        with pytest.raises(BadRequest, match="limit"):
            backend.check_prompt(too_long)
        with pytest.raises(BadRequest, match="limit"):
            await _prefill(backend, too_long)
