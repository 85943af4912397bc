"""The index ingests vLLM/SGLang ZMQ events end to end, and survives garbage on every input."""

from __future__ import annotations

import asyncio
import itertools

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common import subjects
from libs.common.hashing import hash_list
from libs.common.messages import BlocksStored
from libs.lab.servers import free_port
from services.kv_index.config import parse_zmq_endpoints
from tests.kv_index import vllm_wire as w
from tests.kv_index.conftest import Producer, eventually, index_config, start_index

TOKENS = list(range(7, 7 + 64 * 6))
OURS = hash_list(TOKENS, 64)
_FUZZ_RUNS = itertools.count()


async def _wait_for_heartbeat(nc, site: str, instance: str) -> None:
    seen = asyncio.Event()

    async def on_load(_msg) -> None:
        seen.set()

    sub = await nc.subscribe(subjects.load(site, instance), cb=on_load)
    try:
        await asyncio.wait_for(seen.wait(), 10)
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize("encoding", ["positional", "keyed"])
async def test_vllm_zmq_events_make_the_prefix_findable(nats_url, redis_url, nc, client, encoding):
    """16-token engine blocks published on ZMQ are found as our 64-token prefix, and evictions map back."""
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    port = free_port()
    pub.bind(f"tcp://127.0.0.1:{port}")
    endpoints = parse_zmq_endpoints((f"tcp://127.0.0.1:{port}=dc-pd/vllm-0",))
    service, close = await start_index(index_config(nats_url, redis_url, zmq_endpoints=endpoints, zmq_heartbeat_s=0.1))
    try:
        await _wait_for_heartbeat(nc, "dc-pd", "vllm-0")  # the bridge is connected: nothing published now is lost
        ids = w.chain(TOKENS, 16)
        if encoding == "positional":
            ints = [int.from_bytes(h, "big") for h in ids]
            stored = w.positional(1.0, [w.BlockStored(ints, None, TOKENS, 16, None, "GPU")])
            removed = w.positional(2.0, [w.BlockRemoved([ints[13]], "GPU")])
        else:
            stored = w.keyed(1.0, [w.keyed_stored(ids, None, TOKENS, 16)])
            removed = w.keyed(2.0, [{"type": "BlockRemoved", "block_hashes": [ids[13]], "medium": "GPU"}])
        await pub.send_multipart(w.frames(0, stored))

        async def found(blocks: int):
            reply = await client.lookup(OURS, hybrid=False)
            return [(i.site, i.instance, i.attn_kv_blocks) for i in reply.instances] == [("dc-pd", "vllm-0", blocks)]

        await eventually(lambda: found(6), what="all six of our blocks found")
        await pub.send_multipart(w.frames(1, removed))  # engine block 13 lies in our block 3
        await eventually(lambda: found(3), what="prefix cut at our block 3")
    finally:
        await close()
        pub.close(linger=0)
        ctx.term()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.binary(max_size=100), min_size=1, max_size=5))
async def test_garbage_events_and_lookups_never_stop_the_service(index, nc, client, garbage):
    """Random bytes on the event stream are counted and dropped, lookups answered; valid events still apply."""
    js = nc.jetstream()
    bad_before = index.metrics.bad_messages.labels("event")._value.get()
    for data in garbage:
        await js.publish(subjects.kv_events("dc-x", "fuzz"), data)
        reply = await nc.request(subjects.KV_LOOKUP, data, timeout=2)
        assert msgspec.msgpack.decode(reply.data)["type"] in ("error.v1", "kv.lookup_reply.v1")
    p = Producer(nc, "dc-x", f"ok-{next(_FUZZ_RUNS)}")
    await p.heartbeat()
    await p.send(BlocksStored(block_hashes=OURS[:2]))

    async def still_ingesting():
        reply = await client.lookup(OURS, hybrid=False)
        counted = index.metrics.bad_messages.labels("event")._value.get() - bad_before == len(garbage)
        return counted and any(i.instance == p.instance for i in reply.instances)

    await eventually(still_ingesting, what="valid events still applied after garbage")
