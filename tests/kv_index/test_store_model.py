"""The Redis data model answers exactly what a brute-force model of the same events answers."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.lab.servers import RedisServer
from services.kv_index.store import Op, RedisKvStore, pack_hashes

BLOCKS = list(range(1, 25))  # the prompt's block hashes
KINDS = ("attn_kv", "linear_state")
TIERS = ("device", "host")

ops = st.lists(
    st.tuples(
        st.integers(0, 2),  # instance
        st.sampled_from("SSSE"),  # stores more often than evictions
        st.sampled_from(KINDS),
        st.sampled_from(TIERS),
        st.integers(0, 23),
        st.integers(1, 24),
    ),
    max_size=25,
)


def expected(held: dict[tuple[int, str, str], set[int]], instance: int, hybrid: bool) -> tuple[int, int, int] | None:
    """Brute force: (attn_kv, linear_state, usable) prefix of one instance, or None if it holds no first block."""
    attn_blocks = held.get((instance, "attn_kv", "device"), set()) | held.get((instance, "attn_kv", "host"), set())
    lin_blocks = held.get((instance, "linear_state", "device"), set()) | held.get(
        (instance, "linear_state", "host"), set()
    )
    attn = 0
    while attn < len(BLOCKS) and BLOCKS[attn] in attn_blocks:
        attn += 1
    if attn == 0:
        return None
    if not hybrid:
        return attn, 0, attn
    checkpoints = [i + 1 for i, h in enumerate(BLOCKS) if h in lin_blocks]
    lin = max(checkpoints, default=0)
    usable = max((c for c in checkpoints if c <= attn), default=0)
    return attn, lin, usable


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops, hybrid=st.booleans())
def test_lookup_matches_brute_force(redis_server: RedisServer, ops, hybrid):
    """Random stores and evictions over tiers and kinds give the brute-force prefixes."""

    async def run():
        client = aioredis.Redis.from_url(redis_server.url)
        await client.flushall()
        store = RedisKvStore(client)
        await store.ensure_generation()
        slots = [await store.slot_for("dc", f"i{k}") for k in range(3)]
        for slot in slots:
            await store.heartbeat(slot, time.time() + 60)
        for seq, (inst, op, kind, tier, start, length) in enumerate(ops, start=1):
            chunk = BLOCKS[start : start + length]
            await store.apply(slots[inst], seq, [Op(op, kind, tier, pack_hashes(chunk))], False)
            # every instance sees every seq: keep the others' sequences gap-free
            for other in slots:
                if other != slots[inst]:
                    await store.apply(other, seq, [], False)
        got = {
            p.slot: (p.attn_kv_blocks, p.linear_state_blocks, p.usable_blocks)
            for p in await store.lookup(pack_hashes(BLOCKS), time.time(), hybrid)
        }
        await client.aclose()
        return {k: got.get(slots[k]) for k in range(3)}

    got = asyncio.run(run())
    held: dict[tuple[int, str, str], set[int]] = {}
    for inst, op, kind, tier, start, length in ops:
        bucket = held.setdefault((inst, kind, tier), set())
        chunk = BLOCKS[start : start + length]
        if op == "S":
            bucket.update(chunk)
        else:
            bucket.difference_update(chunk)
    assert got == {k: expected(held, k, hybrid) for k in range(3)}
