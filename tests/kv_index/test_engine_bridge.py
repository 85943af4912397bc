"""The vLLM/SGLang bridge against a publisher process that behaves like a real engine, through the real index.

The engine publishes before the index listens, drops batches on the PUB socket, restarts, and
answers (or not) on a replay socket; lookups must find what the engine holds and never what it
may have evicted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import pytest

from libs.common.hashing import hash_list
from libs.lab.vllm_publisher import EnginePublisher, clear, remove, store
from services.kv_index.config import parse_zmq_endpoints
from tests.kv_index.conftest import eventually, index_config, start_index

SITE, INSTANCE = "dc-pd", "vllm-0"
LABEL = f"{SITE}/{INSTANCE}"
ENGINE_BLOCK = 16  # four engine blocks make one of our 64-token blocks


def prompt(first: int, blocks: int) -> list[int]:
    """Tokens of ``blocks`` of our 64-token blocks, distinct from any other ``first``."""
    return list(range(first, first + 64 * blocks))


A, B, C = prompt(1_000, 4), prompt(20_000, 2), prompt(30_000, 3)


async def held(client, tokens: list[int], hybrid: bool = False) -> tuple[int, int, int]:
    """(attn_kv, linear_state, usable) blocks of ``tokens`` the index says the engine holds."""
    reply = await client.lookup(hash_list(tokens, 64), hybrid=hybrid)
    for i in reply.instances:
        if (i.site, i.instance) == (SITE, INSTANCE):
            return i.attn_kv_blocks, i.linear_state_blocks, i.usable_blocks
    return 0, 0, 0


async def until_held(client, tokens: list[int], blocks: int, what: str, timeout_s: float = 10.0) -> None:
    """Wait until the index finds exactly ``blocks`` of ``tokens`` on the engine."""

    async def check() -> bool:
        return (await held(client, tokens))[0] == blocks

    await eventually(check, timeout_s=timeout_s, what=what)


async def first_contact(engine: EnginePublisher, client, first: int = 900_000) -> None:
    """Publish fresh one-block prompts until the bridge has seen one (a new subscription misses the first)."""
    for attempt in range(20):
        probe = prompt(first + attempt * 100, 1)
        await engine.send(store(probe))
        try:
            await until_held(client, probe, 1, "probe", timeout_s=1.0)
            return
        except AssertionError:
            continue
    raise AssertionError("the bridge never saw the engine")


def count(counter, *labels: str) -> float:
    """Current value of a labelled Prometheus counter."""
    return counter.labels(*labels)._value.get()


async def bridged_index(nats_url: str, redis_url: str, engine: EnginePublisher, **overrides):
    """An index service bridging ``engine`` as dc-pd/vllm-0; returns it and its closer."""
    endpoints = parse_zmq_endpoints((engine.endpoint(SITE, INSTANCE),))
    settings = {"zmq_heartbeat_s": 0.1, "zmq_replay_timeout_s": 2.0, **overrides}
    config = index_config(nats_url, redis_url, zmq_endpoints=endpoints, **settings)
    return await start_index(config)


@pytest.mark.parametrize("family", ["sglang", "vllm-six-fields", "vllm-seven-fields", "vllm-map-events"])
async def test_engine_running_before_the_index_is_found_and_a_dropped_batch_is_replayed(
    nats_url, redis_url, nc, client, engines, family
):
    """Blocks stored before the index listened come from the replay buffer; a batch the PUB socket dropped is replayed."""
    engine = await engines(family)
    _, (a_hashes,) = await engine.send(store(A))
    await engine.send(store(C))
    await engine.send(remove(a_hashes[-4:]))  # the engine evicted A's last block of ours before the index came
    service, close = await bridged_index(nats_url, redis_url, engine)
    try:
        await until_held(client, A, 3, "blocks stored before the index started, minus the evicted one")
        assert (await held(client, C))[0] == 3
        await engine.send(remove([a_hashes[5]]), drop=True)  # lost on the PUB socket: A cut at our block 1
        await engine.send(store(B))
        await until_held(client, B, 2, "the batch after the dropped one")
        assert (await held(client, A))[0] == 1
        assert count(service.metrics.engine_gaps_repaired, LABEL) == 1
        assert count(service.metrics.engine_resets, LABEL, "no replay socket") == 0
        assert count(service.metrics.engine_baselines, LABEL, "first contact") == 1
    finally:
        await close()


async def test_a_replay_longer_than_the_engines_send_queue_arrives_whole(nats_url, redis_url, client, engines):
    """First contact replays thousands of buffered batches (more than the engine's 1,000-answer send queue): all are found."""
    engine = await engines("vllm-seven-fields")
    prompts = [prompt(100_000 + i * 100, 1) for i in range(3_000)]
    await engine.send_many([[store(p)] for p in prompts])
    service, close = await bridged_index(nats_url, redis_url, engine, zmq_replay_timeout_s=10.0)
    try:
        await until_held(client, prompts[-1], 1, "the newest buffered batch")
        assert [(await held(client, p))[0] for p in (prompts[0], prompts[999], prompts[2_500])] == [1, 1, 1]
        assert count(service.metrics.engine_replayed_batches, LABEL) == 3_000
    finally:
        await close()


async def test_stopping_the_index_during_a_replay_returns_promptly(nats_url, redis_url, engines):
    """An index stopped while it replays an engine's buffer stops at once (no cancellation lost on the way)."""
    engine = await engines("vllm-map-events")
    await engine.send_many([[store(prompt(100_000 + i * 100, 1))] for i in range(3_000)])
    for delay_s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):  # somewhere in the replay: request, answers, decoding, mapping
        service, close = await bridged_index(nats_url, redis_url, engine)
        await asyncio.sleep(delay_s)
        start = time.monotonic()
        await asyncio.wait_for(close(), 20)
        # A mapping thread already running is awaited (about 1 s for 3,000 batches); 10 s is slack for a loaded box.
        assert time.monotonic() - start < 10


async def test_without_replay_first_contact_is_a_baseline_and_a_gap_drops_the_blocks(
    nats_url, redis_url, client, engines
):
    """No replay socket: blocks from before first contact stay unknown; a gap drops the instance's blocks, counted."""
    engine = await engines("vllm-seven-fields", replay=False)
    await engine.send(store(A))  # nobody listens yet
    service, close = await bridged_index(nats_url, redis_url, engine)
    try:
        await first_contact(engine, client)
        assert (await held(client, A))[0] == 0
        assert count(service.metrics.engine_baselines, LABEL, "first contact") == 1
        await engine.send(store(A))
        await until_held(client, A, 4, "blocks stored after first contact")
        await engine.send(store(C), drop=True)  # lost, and nothing can replay it
        await engine.send(store(B))
        await until_held(client, B, 2, "the batch after the gap starts again")
        assert (await held(client, A))[0] == 0, "blocks that may have been evicted during the gap are dropped"
        assert (await held(client, C))[0] == 0
        assert count(service.metrics.engine_resets, LABEL, "no replay socket") == 1

        await service.store.r.flushall()  # Redis lost everything: the index rebuilds from the stream

        async def rebuilt() -> bool:
            return (await held(client, B))[0] == 2 and (await held(client, A))[0] == 0

        await eventually(rebuilt, what="the same state rebuilt from the stream")
        assert service.metrics.replays._value.get() >= 1
    finally:
        await close()


async def test_gap_older_than_the_replay_buffer_restarts_from_what_it_holds(nats_url, redis_url, client, engines):
    """The replay buffer no longer holds the missing batch: blocks dropped, the buffered batches are the new start."""
    engine = await engines("vllm-map-events", buffer_steps=2)
    service, close = await bridged_index(nats_url, redis_url, engine)
    try:
        await first_contact(engine, client)
        await engine.send(store(A))
        await until_held(client, A, 4, "A stored")
        d1, d2, d3 = prompt(40_000, 1), prompt(41_000, 1), prompt(42_000, 1)
        for dropped in (d1, d2, d3):
            await engine.send(store(dropped), drop=True)
        await engine.send(store(B))  # the buffer now holds d3 and B only
        await until_held(client, B, 2, "B after the reset")
        assert [(await held(client, p))[0] for p in (A, d1, d2, d3)] == [0, 0, 0, 1]
        assert count(service.metrics.engine_resets, LABEL, "replay buffer moved on") == 1
        assert count(service.metrics.engine_gaps_repaired, LABEL) == 0
    finally:
        await close()


async def test_engine_restart_is_a_new_baseline(nats_url, redis_url, client, engines):
    """An engine that restarts (its cache gone, its numbering back at 0) loses its blocks in the index."""
    first = await engines("vllm-seven-fields")
    ports = (first.pub_port, first.replay_port)
    service, close = await bridged_index(nats_url, redis_url, first)
    try:
        await first.send(store(A))
        await until_held(client, A, 4, "A stored")
        await first.stop()
        second = await engines("vllm-seven-fields", ports=ports)
        await second.send(store(B))
        await until_held(client, B, 2, "B from the restarted engine")
        assert (await held(client, A))[0] == 0
        assert count(service.metrics.engine_baselines, LABEL, "reconnect") == 1
    finally:
        await close()


async def test_index_restart_numbers_on_and_replays_the_engine_buffer(nats_url, redis_url, client, engines):
    """A restarted index continues the instance's numbering (nothing taken for a duplicate) and recovers from replay."""
    engine = await engines("vllm-map-events")
    service, close = await bridged_index(nats_url, redis_url, engine)
    await engine.send(store(A))
    await until_held(client, A, 4, "A stored")
    await close()
    await engine.send(store(B))  # while the index is down
    service, close = await bridged_index(nats_url, redis_url, engine)
    try:
        await until_held(client, B, 2, "B, published while the index was down, from the replay buffer")
        assert (await held(client, A))[0] == 4
        await engine.send(store(C))
        await until_held(client, C, 3, "C published after the restart")
        assert count(service.metrics.batches, "dup") == 0
        assert count(service.metrics.batches, "gap") == 0
    finally:
        await close()


async def test_hybrid_groups_and_blocks_that_are_not_ours(nats_url, redis_url, client, engines):
    """Mamba checkpoints come from their group (removals name only the group); LoRA, extra-key and remote blocks are skipped."""
    engine = await engines("vllm-map-events")
    service, close = await bridged_index(nats_url, redis_url, engine)
    try:
        lora, keyed, remote = prompt(50_000, 1), prompt(51_000, 2), prompt(52_000, 1)
        _, (attn, linear, *_) = await engine.send(
            store(A, group_idx=0, kind="full_attention"),
            store(A, block_size=64, group_idx=1, kind="mamba"),  # a checkpoint at each of our boundaries
            store(lora, lora_name="adapter-1"),
            store(keyed, extra_keys=[None] * 4 + [["salt-s"]] + [None] * 3),  # our block 2 is named by more than tokens
            store(remote, locality="REMOTE"),
            {"op": "future", "hashes": ["01" * 32]},
        )
        await eventually(lambda: _is(held(client, A, hybrid=True), (4, 4, 4)), what="A with four checkpoints")
        await engine.send(remove([linear[3]], group_idx=1))  # no kind: the group says it is the mamba state
        await eventually(
            lambda: _is(held(client, A, hybrid=True), (4, 3, 3)), what="last checkpoint gone, attention kept"
        )
        assert [(await held(client, p))[0] for p in (lora, keyed, remote)] == [0, 1, 0]
        assert count(service.metrics.engine_skipped, LABEL, "lora") == 4
        assert count(service.metrics.engine_skipped, LABEL, "remote") == 4
        assert count(service.metrics.engine_skipped, LABEL, "extra_keys") == 4
        assert count(service.metrics.engine_ignored_events, LABEL) == 1
        await engine.send(remove(attn[:1], group_idx=0))  # the first attention block: nothing of A is usable
        await until_held(client, A, 0, "A's first block evicted")
        await engine.send(clear())
        await until_held(client, keyed, 0, "the engine cleared its cache")
    finally:
        await close()


async def test_instance_marked_stale_is_restored_by_the_bridge(nats_url, redis_url, client, engines):
    """When the index marks a bridged instance stale it asks for a snapshot; the bridge answers with what the engine holds."""
    engine = await engines("vllm-seven-fields")
    service, close = await bridged_index(nats_url, redis_url, engine)
    try:
        await engine.send(store(A))
        await until_held(client, A, 4, "A stored")
        slot = await service.store.slot_for(SITE, INSTANCE)
        await service.store.r.hset(f"{service.config.key_prefix}inst:{slot}", "stale", "1")
        assert (await held(client, A))[0] == 0
        await engine.send(store(B))  # applied as 'stale': the index asks the bridge for a snapshot
        await until_held(client, A, 4, "A restored by the bridge's snapshot")
        await until_held(client, B, 2, "B in the snapshot too")
    finally:
        await close()


async def _is(value: Awaitable, expected) -> bool:
    return await value == expected
