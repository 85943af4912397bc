"""KV index service against real NATS and Redis: ingest, lookups, restarts, outages, staleness."""

from __future__ import annotations

import time

import pytest

from libs.common import subjects
from libs.common.errors import BadRequest, IndexUnavailable
from libs.common.hashing import hash_list
from libs.common.messages import (
    AllBlocksCleared,
    BlocksEvicted,
    BlocksStored,
    ErrorReply,
    KvSnapshot,
    KvSnapshotRequest,
    kv_lookup_result_decoder,
    kv_snapshot_request_decoder,
)
from tests.kv_index.conftest import Producer, eventually, index_config, start_index

PROMPT = hash_list(list(range(64 * 40)))  # 40 blocks


def prefix_of(reply, site: str, instance: str) -> tuple[int, int, int] | None:
    """(attn_kv, linear_state, usable) blocks of one instance in a lookup reply."""
    for i in reply.instances:
        if (i.site, i.instance) == (site, instance):
            return i.attn_kv_blocks, i.linear_state_blocks, i.usable_blocks
    return None


async def test_ingest_then_lookup_finds_longest_prefix_per_instance(index, nc, client):
    """Stored blocks become visible per instance and per site, longest prefix first."""
    a, b = Producer(nc, "dc-a", "p0"), Producer(nc, "dc-b", "d0")
    await a.heartbeat()
    await b.heartbeat()
    await a.send(BlocksStored(block_hashes=PROMPT[:30]))
    await b.send(BlocksStored(block_hashes=PROMPT[:12]))

    async def both_visible():
        r = await client.lookup(PROMPT, hybrid=False)
        return prefix_of(r, "dc-a", "p0") == (30, 0, 30) and prefix_of(r, "dc-b", "d0") == (12, 0, 12)

    await eventually(both_visible, what="both prefixes visible")
    reply = await client.lookup(PROMPT, hybrid=False)
    assert reply.blocks_total == 40
    assert [(s.site, s.usable_blocks) for s in reply.sites] == [("dc-a", 30), ("dc-b", 12)]
    only_b = await client.lookup(PROMPT, hybrid=False, sites=["dc-b"])
    assert [(i.site, i.instance) for i in only_b.instances] == [("dc-b", "d0")]


async def test_eviction_shortens_prefix_and_tiers_are_tracked_separately(index, nc, client):
    """Evicting a block cuts the prefix there; a copy left in another tier keeps it usable."""
    p = Producer(nc, "dc-a", "p0")
    await p.heartbeat()
    await p.send(
        BlocksStored(block_hashes=PROMPT[:20], tier="device"), BlocksStored(block_hashes=PROMPT[:20], tier="host")
    )
    await p.send(BlocksEvicted(block_hashes=PROMPT[10:20], tier="device"))

    async def still_20():
        return prefix_of(await client.lookup(PROMPT, hybrid=False), "dc-a", "p0") == (20, 0, 20)

    await eventually(still_20, what="host copy keeps the prefix")
    await p.send(BlocksEvicted(block_hashes=PROMPT[15:16], tier="host"))

    async def cut_at_15():
        return prefix_of(await client.lookup(PROMPT, hybrid=False), "dc-a", "p0") == (15, 0, 15)

    await eventually(cut_at_15, what="prefix cut at the evicted block")


async def test_hybrid_usable_prefix_needs_attention_kv_and_a_linear_checkpoint(index, nc, client):
    """Usable prefix = longest boundary with both attn_kv up to it and a linear_state checkpoint at it."""
    p = Producer(nc, "dc-a", "p0")
    await p.heartbeat()
    checkpoints = [PROMPT[i - 1] for i in (8, 16, 24, 32)]  # state after 8, 16, 24, 32 blocks
    await p.send(BlocksStored(block_hashes=PROMPT[:20]), BlocksStored(block_hashes=checkpoints, kind="linear_state"))

    async def hybrid_rule():
        return prefix_of(await client.lookup(PROMPT), "dc-a", "p0") == (20, 32, 16)

    await eventually(hybrid_rule, what="usable = 16 (last checkpoint within 20 attn blocks)")
    assert prefix_of(await client.lookup(PROMPT, hybrid=False), "dc-a", "p0") == (20, 0, 20)
    await p.send(BlocksEvicted(block_hashes=[PROMPT[15]], kind="linear_state"))

    async def falls_back_to_8():
        return prefix_of(await client.lookup(PROMPT), "dc-a", "p0") == (20, 32, 8)

    await eventually(falls_back_to_8, what="losing a checkpoint falls back to the previous one")


async def _not(check) -> bool:
    return not await check()


async def test_instances_that_stop_heartbeating_expire_from_answers(nats_url, redis_url, nc, client):
    """An instance whose heartbeats stop is left out of answers after instance_ttl_s."""
    service, close = await start_index(index_config(nats_url, redis_url, instance_ttl_s=0.6))
    try:
        p = Producer(nc, "dc-a", "p0")
        await p.heartbeat()
        last_beat = time.monotonic()
        await p.send(BlocksStored(block_hashes=PROMPT[:5]))

        async def visible():
            return prefix_of(await client.lookup(PROMPT), "dc-a", "p0") is not None

        await eventually(visible, what="instance visible while heartbeating")
        await eventually(lambda: _not(visible), what="instance gone once its ttl passed", timeout_s=5.0)
        # Never before the 0.6 s ttl (the index stamps the heartbeat after it arrives, so a little later); the 5 s
        # deadline is the ttl plus the lookups' own time on a loaded 2-core host.
        assert time.monotonic() - last_beat >= 0.6
        await p.heartbeat()
        await eventually(visible, what="visible again after a heartbeat")
    finally:
        await close()


async def test_restart_loses_no_event(nats_url, redis_url, nc, client):
    """Events published while the index is down are applied after it restarts (durable consumer)."""
    config = index_config(nats_url, redis_url)
    service, close = await start_index(config)
    p = Producer(nc, "dc-a", "p0")
    await p.heartbeat()
    await p.send(BlocksStored(block_hashes=PROMPT[:10]))
    await eventually(lambda: _usable_is(client, 10), what="first batch applied")
    await close()
    await p.send(BlocksStored(block_hashes=PROMPT[10:25]))  # index is down
    service, close = await start_index(config)
    try:
        await p.heartbeat()
        await eventually(lambda: _usable_is(client, 25), what="batch sent while down applied after restart")
        assert service.metrics.sequence_gaps._value.get() == 0
    finally:
        await close()


async def _usable_is(client, blocks: int) -> bool:
    return prefix_of(await client.lookup(PROMPT, hybrid=False), "dc-a", "p0") == (blocks, 0, blocks)


async def test_redis_outage_gives_index_unavailable_then_recovers(nats_url, redis_server, nc, client):
    """With Redis down lookups fail fast with index_unavailable; when it returns empty, the index rebuilds."""
    config = index_config(nats_url, redis_server.url, lookup_timeout_s=0.4)
    service, close = await start_index(config)
    try:
        p = Producer(nc, "dc-a", "p0")
        await p.heartbeat()
        await p.send(BlocksStored(block_hashes=PROMPT[:10]))
        await eventually(lambda: _usable_is(client, 10), what="applied before the outage")

        redis_server.stop()
        start = time.monotonic()
        with pytest.raises(IndexUnavailable):
            await client.lookup(PROMPT)
        # Bound: the 0.4 s lookup deadline plus NATS round trips; 1.5 s leaves room on a loaded 2-core box.
        assert 0.0 < time.monotonic() - start < 1.5
        await p.send(BlocksStored(block_hashes=PROMPT[10:30]))  # published during the outage

        redis_server.start()  # comes back empty: no persistence
        await p.heartbeat()

        async def rebuilt():
            await p.heartbeat()
            return await _usable_is(client, 30)

        await eventually(rebuilt, timeout_s=15, what="index rebuilt from the stream after Redis returned")
        assert service.metrics.replays._value.get() >= 1
    finally:
        await close()


async def test_sequence_gap_marks_instance_stale_until_snapshot(index, nc, client):
    """A missing sequence number hides the instance, asks it for a snapshot, and a snapshot restores it."""
    requests: list[KvSnapshotRequest] = []

    async def on_request(msg) -> None:
        requests.append(kv_snapshot_request_decoder.decode(msg.data))

    sub = await nc.subscribe(subjects.kv_snapshot_request("dc-a", "p0"), cb=on_request)
    p = Producer(nc, "dc-a", "p0")
    await p.heartbeat()
    await p.send(BlocksStored(block_hashes=PROMPT[:10]))
    await eventually(lambda: _usable_is(client, 10), what="first batch applied")
    await p.send(BlocksStored(block_hashes=PROMPT[10:20]), seq=3)  # seq 2 never arrives

    async def hidden():
        return prefix_of(await client.lookup(PROMPT, hybrid=False), "dc-a", "p0") is None

    await eventually(hidden, what="stale instance hidden")
    await eventually(_async(lambda: len(requests) >= 1), what="snapshot requested")
    req: KvSnapshotRequest = requests[0]
    assert (req.expected_seq, req.received_seq) == (2, 3)
    assert index.metrics.sequence_gaps._value.get() == 1
    await p.send(BlocksStored(block_hashes=PROMPT[:5]))  # ignored: still stale
    await p.send(KvSnapshot(stored=[BlocksStored(block_hashes=PROMPT[:18])]))
    await eventually(lambda: _usable_is(client, 18), what="snapshot replaces the state")
    await p.send(AllBlocksCleared())

    await eventually(hidden, what="cleared instance holds nothing")
    await sub.unsubscribe()


def _async(predicate):
    async def check():
        return predicate()

    return check


async def test_bad_lookup_gets_typed_error_and_service_keeps_answering(index, nc, client):
    """Garbage and out-of-range hashes are answered with bad_request; the next lookup still works."""
    reply = await nc.request(subjects.KV_LOOKUP, b"\xc1garbage", timeout=2)
    decoded = kv_lookup_result_decoder.decode(reply.data)
    assert isinstance(decoded, ErrorReply) and decoded.code == "bad_request"
    with pytest.raises(BadRequest):
        await client.lookup([5, -1])
    ok = await client.lookup(PROMPT)
    assert ok.blocks_total == len(PROMPT)
    assert index.metrics.lookups.labels("bad_request")._value.get() == 2


async def test_long_silent_instance_is_forgotten_and_asked_for_a_snapshot_on_return(nats_url, redis_url, nc, client):
    """After forget_after_s of silence an instance's blocks are dropped; when it returns it must resend a snapshot."""
    service, close = await start_index(index_config(nats_url, redis_url, instance_ttl_s=0.3, forget_after_s=1.0))
    requests: list[KvSnapshotRequest] = []

    async def on_request(msg) -> None:
        requests.append(kv_snapshot_request_decoder.decode(msg.data))

    sub = await nc.subscribe(subjects.kv_snapshot_request("dc-a", "p0"), cb=on_request)
    try:
        p = Producer(nc, "dc-a", "p0")
        await p.heartbeat()
        await p.send(BlocksStored(block_hashes=PROMPT[:10]))
        await eventually(lambda: _usable_is(client, 10), what="applied")
        owned = f"{service.config.key_prefix}own:{await service.store.slot_for('dc-a', 'p0')}:attn"

        async def forgotten():
            return await service.store.r.scard(owned) == 0

        await eventually(forgotten, timeout_s=5, what="blocks of the silent instance dropped")
        await p.heartbeat()
        await p.send(BlocksStored(block_hashes=PROMPT[10:12]))
        await eventually(_async(lambda: len(requests) >= 1), what="returning instance asked for a snapshot")
        assert prefix_of(await client.lookup(PROMPT, hybrid=False), "dc-a", "p0") is None
    finally:
        await sub.unsubscribe()
        await close()
