"""A simulated decode that advances several steps per wake-up gives the same tokens at the same modelled times."""

from __future__ import annotations

import asyncio
import time

from libs.engine.backends import Restored
from libs.engine.sampling import Sampling
from libs.engine.simulated import SimulatedBackend

SCALE = 0.2  # H20 steps of 7.4 ms (batch 1) to 13.8 ms (batch 8) become 1.5-2.8 ms
STEP_1_S = 0.0074 * SCALE


async def _decode(backend: SimulatedBackend, request_id: str, max_tokens: int) -> tuple[list[int], list[float], int]:
    """Tokens, the wall time each output arrived (from the call) and the number of outputs."""
    start, tokens, at, outputs = time.monotonic(), [], [], 0
    async for out in backend.decode_restored(
        Restored(request_id, 1000, None, 0), max_tokens, Sampling(ignore_eos=True)
    ):
        tokens += out.token_ids
        at += [time.monotonic() - start] * len(out.token_ids)
        outputs += 1
    return tokens, at, outputs


async def test_chunked_decode_streams_the_same_tokens_in_the_same_time_in_fewer_messages():
    """256 tokens alone: identical tokens, 9 outputs instead of 256, and the modelled time: one step at a time is
    never faster, and pays a wake-up per token on top (what chunks save)."""
    results = {}
    for chunk in (1, 32):
        async with SimulatedBackend("h20", "kimi-linear-1t", SCALE, 0.001, decode_chunk=chunk) as backend:
            results[chunk] = await _decode(backend, "r1", 256)
    (one, at_one, n_one), (chunked, at_chunked, n_chunked) = results[1], results[32]
    assert chunked == one and (n_one, n_chunked) == (256, 1 + 8)  # the first token alone, then 255 in chunks of 32
    modelled_s = 256 * STEP_1_S  # ~0.38 s
    # The chunked decode sleeps the modelled steps in 9 wake-ups; 15% over leaves a loaded 2-core host's late timers.
    assert modelled_s <= at_chunked[-1] <= 1.15 * modelled_s
    assert at_one[-1] >= 0.99 * at_chunked[-1]  # 256 wake-ups are never faster than 9
    assert at_chunked[0] < 3 * STEP_1_S + 0.02  # the first token is one step away, not a chunk


async def test_a_request_arriving_mid_chunk_joins_within_a_step():
    """While one request decodes in chunks of 64, a second one gets its first token about one step after arriving."""
    async with SimulatedBackend("h20", "kimi-linear-1t", SCALE, 0.001, decode_chunk=64) as backend:
        first = asyncio.create_task(_decode(backend, "long", 2000))
        await asyncio.sleep(0.05)  # the first request is inside a 64-step chunk (~0.1 s)
        tokens, at, _ = await _decode(backend, "late", 4)
        await first
    assert len(tokens) == 4
    # Joining waits for the step under way (<= 1 step at batch 1), then its own first step (batch 2): ~3-4 ms modelled.
    # A whole chunk would be ~0.1 s; 40 ms leaves room for a loaded host's timers and is still far below it.
    assert at[0] < 0.04
