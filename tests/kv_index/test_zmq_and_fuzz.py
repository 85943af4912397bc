"""Garbage on every input of the running index (ZMQ bridge, event stream, lookups, heartbeats) is counted, never fatal."""

from __future__ import annotations

import itertools
import time

import msgspec
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common import subjects
from libs.common.hashing import hash_list
from libs.common.messages import (
    BlocksStored,
    ErrorReply,
    KvEventBatch,
    KvLookupRequest,
    encode,
    kv_lookup_result_decoder,
)
from libs.lab.servers import free_port
from libs.lab.vllm_wire import FAMILIES, frames
from services.kv_index.config import parse_zmq_endpoints
from tests.kv_index.conftest import Producer, eventually, index_config, start_index

FAMILY = FAMILIES["vllm-map-events"]
_RUNS = itertools.count(1)

VALID_ENGINE_PAYLOAD = FAMILY.batch(1.0, [FAMILY.stored(FAMILY.chain(list(range(64)), 16), None, list(range(64)), 16)])
WRONGLY_TYPED_ENGINE_PAYLOADS = [
    msgspec.msgpack.encode(x)
    for x in (
        None,
        "batch",
        [1.0],
        ["now", []],
        [1.0, {"BlockStored": 1}],
        [1.0, [["BlockStored", "hashes", None, [1], 1]]],
        [1.0, [["BlockStored", [1], None, [-1], 1]]],
        [1.0, [["BlockStored", [1], None, [1], True]]],
        [1.0, [["BlockStored", [1], 2.5, [1], 1]]],
        [1.0, [["BlockRemoved", [None]]]],
        [1.0, [{"type": "BlockRemoved", "block_hashes": [1], "medium": 3}]],
        [1.0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 1, "locality": 1}]],
        [1.0, [{"no_type": 1}]],
    )
]

engine_garbage = st.one_of(
    st.lists(st.binary(max_size=16), min_size=1, max_size=6).filter(lambda f: len(f) != 3),  # wrong number of frames
    st.tuples(st.binary(max_size=16), st.binary(max_size=16).filter(lambda b: len(b) != 8), st.binary(max_size=32)).map(
        list
    ),
    st.tuples(st.integers(2**63, 2**64 - 1), st.binary(max_size=8)).map(
        lambda t: [b"t", t[0].to_bytes(8, "big"), t[1]]
    ),  # seq < 0
    st.tuples(
        st.integers(0, 2**40),
        st.one_of(
            st.integers(0, len(VALID_ENGINE_PAYLOAD) - 1).map(lambda n: VALID_ENGINE_PAYLOAD[:n]),  # truncated
            st.sampled_from(WRONGLY_TYPED_ENGINE_PAYLOADS),
            st.binary(max_size=40).map(lambda b: b"\xc1" + b),  # 0xc1 is never valid msgpack
        ),
    ).map(lambda t: frames(t[0], t[1])),
)


@pytest.fixture
async def bridged(nats_url, redis_url, client):
    """An index bridging a PUB socket owned by the test (which plays the engine), after first contact."""
    ctx = zmq.asyncio.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = free_port()
    pub.bind(f"tcp://127.0.0.1:{port}")
    endpoints = parse_zmq_endpoints((f"tcp://127.0.0.1:{port}=dc-pd/fuzzed",))
    service, close = await start_index(index_config(nats_url, redis_url, zmq_endpoints=endpoints, zmq_heartbeat_s=0.1))
    engine = _Engine(pub)
    try:
        for _ in range(40):  # a new subscription misses the first messages
            if await engine.stored_and_found(client, timeout_s=0.5):
                break
        else:
            raise AssertionError("the bridge never saw the engine")
        yield service, engine
    finally:
        await close()
        pub.close(linger=0)
        ctx.term()


class _Engine:
    """Publishes well-formed batches of fresh prompts with increasing sequence numbers."""

    def __init__(self, pub) -> None:
        self.pub = pub
        self.seq = 0

    async def send(self, raw: list[bytes]) -> None:
        await self.pub.send_multipart(raw)

    async def stored_and_found(self, client, timeout_s: float = 10.0) -> bool:
        """Store a fresh prompt in one batch; True once the index finds it."""
        self.seq += 1
        tokens = list(range(self.seq * 1000, self.seq * 1000 + 64))
        ids = FAMILY.chain(tokens, 16)
        await self.pub.send_multipart(
            frames(self.seq, FAMILY.batch(time.time(), [FAMILY.stored(ids, None, tokens, 16)]))
        )

        async def found() -> bool:
            reply = await client.lookup(hash_list(tokens, 64), hybrid=False)
            return [(i.instance, i.attn_kv_blocks) for i in reply.instances] == [("fuzzed", 1)]

        try:
            await eventually(found, timeout_s=timeout_s, what="fresh prompt found")
        except AssertionError:
            return False
        return True


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(engine_garbage, min_size=1, max_size=4))
async def test_garbage_zmq_frames_are_counted_and_the_bridge_keeps_serving(bridged, client, garbage):
    """Malformed frames, truncated or wrongly typed batches from the engine are counted; the next good batch is found."""
    service, engine = bridged
    before = service.metrics.bad_messages.labels("zmq")._value.get()
    for raw in garbage:
        await engine.send(raw)
    assert await engine.stored_and_found(client), "a well-formed batch after garbage must be found"
    assert service.metrics.bad_messages.labels("zmq")._value.get() - before == len(garbage)


async def test_garbage_snapshot_requests_are_counted(bridged, nc):
    """A malformed snapshot request to a bridged instance is counted and ignored."""
    service, _ = bridged
    await nc.publish(subjects.kv_snapshot_request("dc-pd", "fuzzed"), b"\xc1")
    await eventually(_counted(service, "snapshot_request", 1), what="bad snapshot request counted")


def _counted(service, source: str, n: int):
    async def check() -> bool:
        return service.metrics.bad_messages.labels(source)._value.get() == n

    return check


_VALID_BATCH = msgspec.to_builtins(
    KvEventBatch(site="dc-x", instance="fuzz", seq=1, ts=1.0, events=[BlocksStored(block_hashes=[1, 2])])
)
WRONGLY_TYPED_BATCHES = [
    {**_VALID_BATCH, "seq": 0},
    {**_VALID_BATCH, "seq": -3},
    {**_VALID_BATCH, "seq": "1"},
    {**_VALID_BATCH, "seq": 1.5},
    {**_VALID_BATCH, "site": "a.b"},
    {**_VALID_BATCH, "instance": ""},
    {**_VALID_BATCH, "ts": "now"},
    {**_VALID_BATCH, "events": 5},
    {**_VALID_BATCH, "events": [{"type": "kv.stored.v1", "block_hashes": [-1]}]},
    {**_VALID_BATCH, "events": [{"type": "kv.stored.v1", "block_hashes": [1], "kind": "weights"}]},
    {**_VALID_BATCH, "events": [{"type": "kv.nothing.v1"}]},
    {**_VALID_BATCH, "type": "kv.lookup.v1"},
]
WRONGLY_TYPED_LOOKUPS = [
    {"type": "kv.lookup.v1", "block_hashes": ["a"]},
    {"type": "kv.lookup.v1", "block_hashes": [-1]},
    {"type": "kv.lookup.v1", "block_hashes": 5},
    {"type": "kv.lookup.v1", "block_hashes": [1], "hybrid": "yes"},
    {"type": "kv.batch.v1", "block_hashes": [1]},
]
_VALID_LOOKUP = encode(KvLookupRequest(block_hashes=[1, 2, 3]))


def _bad_bytes(valid: bytes, wrongly_typed: list[dict]):
    return st.one_of(
        st.binary(max_size=60).map(lambda b: b"\xc1" + b),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
        st.sampled_from([msgspec.msgpack.encode(d) for d in wrongly_typed]),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    events=st.lists(_bad_bytes(msgspec.msgpack.encode(_VALID_BATCH), WRONGLY_TYPED_BATCHES), max_size=4),
    lookups=st.lists(_bad_bytes(_VALID_LOOKUP, WRONGLY_TYPED_LOOKUPS), max_size=4),
    loads=st.lists(st.binary(max_size=30).map(lambda b: b"\xc1" + b), max_size=2),
)
async def test_garbage_on_the_bus_is_counted_and_the_index_keeps_answering(index, nc, client, events, lookups, loads):
    """Random, truncated and wrongly typed events, lookups and heartbeats are counted; valid ones still work."""
    js = nc.jetstream()
    bad = index.metrics.bad_messages
    before = {s: bad.labels(s)._value.get() for s in ("event", "load")}
    bad_lookups = index.metrics.lookups.labels("bad_request")._value.get()
    for data in events:
        await js.publish(subjects.kv_events("dc-x", "fuzz"), data)
    for data in lookups:
        reply = kv_lookup_result_decoder.decode((await nc.request(subjects.KV_LOOKUP, data, timeout=2)).data)
        assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
    for data in loads:
        await nc.publish(subjects.load("dc-x", "fuzz"), data)
    p = Producer(nc, "dc-x", f"ok-{next(_RUNS)}")
    await p.heartbeat()
    prompt = hash_list(list(range(640)))
    await p.send(BlocksStored(block_hashes=prompt[:3]))

    async def still_serving() -> bool:
        reply = await client.lookup(prompt, hybrid=False)
        return [(i.instance, i.attn_kv_blocks) for i in reply.instances if i.instance == p.instance] == [
            (p.instance, 3)
        ]

    await eventually(still_serving, what="valid events still applied after garbage")
    assert bad.labels("event")._value.get() - before["event"] == len(events)
    assert bad.labels("load")._value.get() - before["load"] == len(loads)
    assert index.metrics.lookups.labels("bad_request")._value.get() - bad_lookups == len(lookups)
