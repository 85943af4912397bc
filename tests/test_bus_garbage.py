"""Hostile input on the bus: every subject a service listens on refuses garbage, and the service goes on serving.

The KV index, a router, a decode gateway (TCP and JetStream receivers) and a prefill gateway run in this
process on one nats-server (``max_payload`` 8 MB, as the lab's) and one redis-server, so their counters
are read directly. Each subject gets one matrix: bytes that are no msgpack, msgpack of another type,
another message's Struct, the subject's own message at an unknown version (tag ``.v2``) or missing a
required field, decodable messages no sender makes (negative or non-finite numbers, names that are no
subject tokens, unpublishable reply subjects) and a payload just under the server's ``max_payload``.
Every one is counted (a request is answered ``bad_request``), and a good message after them is served.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import pytest
import pytest_asyncio
from nats.aio.client import Client as NatsClient

from libs.bench.gateways import CLUSTER, DECODE_SITE, PREFILL_SITE, Caller, gateway_env
from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.errors import PrfaasError
from libs.common.handling import MAX_STRING_CHARS, ask
from libs.common.messages import (
    MAX_BATCH_EVENTS,
    MAX_BATCH_HASHES,
    AllBlocksCleared,
    BlocksEvicted,
    BlocksStored,
    DecodeJob,
    ErrorReply,
    InstanceLoad,
    JobCancel,
    KvDestination,
    KvEventBatch,
    KvLookupReply,
    KvLookupRequest,
    KvSnapshot,
    KvSnapshotRequest,
    KvStatusRequest,
    LinkShareAnnounce,
    LinkStats,
    PrefillJob,
    ResendTokens,
    Sampling,
    TokenChunk,
    batch_size,
    encode,
    kv_lookup_result_decoder,
)
from libs.common.service import BusService
from libs.engine.backends import ReferenceBackend
from libs.engine.events import SNAPSHOT_EVERY_S, within_limits
from libs.lab.servers import NatsServer, RedisServer
from services.decode_gateway.config import DecodeGatewayConfig
from services.decode_gateway.service import DecodeGatewayService
from services.kv_index.handlers import MAX_LOOKUP_BLOCKS
from services.kv_index.service import KvIndexService
from services.prefill_gateway.config import PrefillGatewayConfig
from services.prefill_gateway.service import PrefillGatewayService
from services.router.service import RouterService
from tests.kv_index.conftest import eventually, index_config, start_index
from tests.router.conftest import router_config

pytestmark = pytest.mark.asyncio(loop_scope="module")

PREFILL, DECODE, JOB = "garbage-p0", "garbage-d0", "garbage-job"
MODEL = "reference"  # what ReferenceBackend serves
PROMPT = list(range(40, 140))
_probes = itertools.count()


@dataclass
class Deployment:
    """The four services on one server, a hostile client and a caller that runs whole requests."""

    nc: NatsClient
    index: KvIndexService
    router: RouterService
    decode: DecodeGatewayService
    prefill: PrefillGatewayService
    caller: Caller
    job_queue: asyncio.Queue  # the router's mailbox queue of ``JOB``: garbage on its subjects must not reach it


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployment(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Deployment]:
    """Every service of the house in this process over fresh servers, stopped at the module's end."""
    workdir: Path = tmp_path_factory.mktemp("bus_garbage")
    nats, redis = NatsServer(workdir=workdir / "nats").start(), RedisServer(workdir=workdir / "redis").start()
    clients: list[NatsClient] = []
    try:
        clients = [await connect(nats.url, name=name) for name in ("hostile", "router", "decode", "prefill")]
        nc, router_nc, decode_nc, prefill_nc = clients
        index, close_index = await start_index(index_config(nats.url, redis.url))
        decode_cfg = DecodeGatewayConfig.from_env(
            gateway_env("decode_gateway", nats.url, site=DECODE_SITE, instance=DECODE, heartbeat_s=0.1)
        )
        prefill_cfg = PrefillGatewayConfig.from_env(
            gateway_env(
                "prefill_gateway", nats.url, site=PREFILL_SITE, cluster=CLUSTER, instances=PREFILL, heartbeat_s=0.1
            )
        )
        backends = ReferenceBackend(), ReferenceBackend()
        try:
            async with (
                RouterService(
                    router_nc, router_config(nats.url, policy="static-threshold", threshold_tokens=0)
                ) as router,
                DecodeGatewayService(decode_nc, backends[0], decode_cfg) as decode,
                PrefillGatewayService(prefill_nc, {PREFILL: backends[1]}, prefill_cfg) as prefill,
                Caller(nc, cluster=CLUSTER) as caller,
            ):
                await caller.reachable(nc)
                yield Deployment(nc, index, router, decode, prefill, caller, router.mailbox.open(JOB))
        finally:
            for backend in backends:
                await backend.close()
            await close_index()
    finally:
        for client in clients:
            await client.close()
        nats.stop()
        redis.stop()


# --- what each subject hears: its own message, decodable lies, the counters that must move, a good message -------


def _tagged(message: msgspec.Struct, **lies: object) -> dict:
    """``message`` as a dict with ``lies`` written over its fields."""
    return msgspec.to_builtins(message) | lies


LOAD = InstanceLoad(site=DECODE_SITE, instance="garbage-load", role="decode", ts=1.0)
LINK = LinkStats(
    src_site=PREFILL_SITE,
    dst_site=DECODE_SITE,
    ts=1.0,
    interval_s=1.0,
    budget_gbps=10.0,
    goodput_gbps=1.0,
    busy_goodput_gbps=1.0,
    utilization=0.1,
    rtt_s=0.01,
    min_rtt_s=0.01,
    bytes_in_flight=0,
    active_transfers=0,
    acked_bytes_total=0,
    retransmitted_bytes_total=0,
    retransmitted_chunks_total=0,
    transfers_completed_total=0,
    transfers_failed_total=0,
)
DECODE_JOB = DecodeJob(
    request_id="garbage",
    transfer_id="tgarbage",
    model=MODEL,
    prompt_tokens=PROMPT,
    max_tokens=4,
    reply_subject="garbage.reply",
    prefill_site=PREFILL_SITE,
)
PREFILL_JOB = PrefillJob(
    request_id="garbage",
    transfer_id="tgarbage",
    model=MODEL,
    prompt_tokens=PROMPT,
    destination=KvDestination(site=DECODE_SITE, instance=DECODE, host="127.0.0.1", port=9),
)
SHARE = LinkShareAnnounce(
    src_site=PREFILL_SITE,
    dst_site=DECODE_SITE,
    process="garbage-peer",
    budget_gbps=10.0,
    demand_gbps=1.0,
    rate_gbps=1.0,
    interval_s=0.5,
    seq=1,
)
NAN, INF = math.nan, math.inf


@dataclass(frozen=True)
class Listener:
    """One subject a service listens on: its message, lies about it, where refusals are counted, a good message."""

    subject: Callable[[Deployment], str]
    message: msgspec.Struct
    lies: tuple[dict, ...]
    counters: Callable[[Deployment], list]  # label children that count each refused message once
    served: Callable[[Deployment], Awaitable[None]]  # a good message or request after the garbage is served
    request: bool = False
    stream: bool = False  # published into JetStream (the index's KV events)


async def _heartbeat_taken(d: Deployment) -> None:
    instance = f"probe-{next(_probes)}"
    await d.nc.publish(subjects.load(DECODE_SITE, instance), encode(msgspec.structs.replace(LOAD, instance=instance)))
    await eventually(lambda: _true(d.router.view.load_of(instance) is not None), what="a good heartbeat taken")


async def _link_taken(d: Deployment) -> None:
    src = f"probe-{next(_probes)}"
    await d.nc.publish(subjects.link(src, DECODE_SITE), encode(msgspec.structs.replace(LINK, src_site=src)))
    await eventually(lambda: _true(d.router.view.link_gbps(src) is not None), what="a good LinkStats taken")


async def _token_taken(d: Deployment) -> None:
    assert d.job_queue.empty(), "garbage reached the job's queue"
    await d.nc.publish(d.router.mailbox.tokens_subject(JOB), encode(TokenChunk(request_id=JOB, index=0, token_ids=[7])))
    async with asyncio.timeout(5):
        kind, item = await d.job_queue.get()
    assert (kind, item.token_ids) == ("tokens", [7])


async def _lookup_answered(d: Deployment) -> None:
    reply = await d.nc.request(subjects.KV_LOOKUP, encode(KvLookupRequest(block_hashes=[1, 2])), timeout=5)
    assert isinstance(kv_lookup_result_decoder.decode(reply.data), KvLookupReply)


async def _batch_applied(d: Deployment) -> None:
    instance, hashes = f"probe-{next(_probes)}", [next(_probes) + 10**9, next(_probes) + 10**9]
    await d.nc.publish(
        subjects.load(PREFILL_SITE, instance),
        encode(msgspec.structs.replace(LOAD, site=PREFILL_SITE, instance=instance)),
    )
    batch = KvEventBatch(
        site=PREFILL_SITE, instance=instance, seq=1, ts=time.time(), events=[BlocksStored(block_hashes=hashes)]
    )
    await d.nc.jetstream().publish(subjects.kv_events(PREFILL_SITE, instance), encode(batch), timeout=5)

    async def found() -> bool:
        reply = await d.nc.request(
            subjects.KV_LOOKUP, encode(KvLookupRequest(block_hashes=hashes, hybrid=False)), timeout=2
        )
        return any(i.instance == instance for i in kv_lookup_result_decoder.decode(reply.data).instances)

    await eventually(found, what="a good batch after the garbage applied")


def _request_served(transport: str = "tcp") -> Callable[[Deployment], Awaitable[None]]:
    async def served(d: Deployment) -> None:
        out = await d.caller.request(PROMPT, DECODE, model=MODEL, max_tokens=4, transport=transport, timeout_s=20)
        assert len(out.tokens) == 4 and not isinstance(out.final, ErrorReply), out.final

    return served


async def _true(value: bool) -> bool:
    return value


def _snapshot_served(events: Callable[[Deployment], object]) -> Callable[[Deployment], Awaitable[None]]:
    async def served(d: Deployment) -> None:
        publisher = events(d)
        before = publisher.published_batches
        request = KvSnapshotRequest(site=publisher.site, instance=publisher.instance, expected_seq=1, received_seq=3)
        await d.nc.publish(subjects.kv_snapshot_request(publisher.site, publisher.instance), encode(request))
        await eventually(lambda: _true(publisher.published_batches > before), what="a snapshot answered")

    return served


def _snapshot_request(site: str, instance: str) -> KvSnapshotRequest:
    return KvSnapshotRequest(site=site, instance=instance, expected_seq=1, received_seq=3)


LISTENERS = {
    "router+index load": Listener(
        lambda d: subjects.load(DECODE_SITE, "garbage-load"),
        LOAD,
        (
            {"site": "a.b"},
            {"queue_depth": -1},
            {"expected_wait_s": NAN},
            {"tcp_port": 2**64 - 1},
            {"model": "m" * (MAX_STRING_CHARS + 1)},
        ),
        lambda d: [d.router.metrics.bad_messages.labels("load"), d.index.metrics.bad_messages.labels("load")],
        _heartbeat_taken,
    ),
    "router link": Listener(
        lambda d: subjects.link(PREFILL_SITE, DECODE_SITE),
        LINK,
        ({"src_site": "a b"}, {"goodput_gbps": -1.0}, {"rtt_s": INF}, {"utilization": NAN}),
        lambda d: [d.router.metrics.bad_messages.labels("link")],
        _link_taken,
    ),
    "router mailbox": Listener(
        lambda d: d.router.mailbox.tokens_subject(JOB),
        TokenChunk(request_id=JOB, index=0, token_ids=[1]),
        (),
        lambda d: [d.router.mailbox.bad_messages.labels("mailbox")],
        _token_taken,
    ),
    "index lookup": Listener(
        lambda d: subjects.KV_LOOKUP,
        KvLookupRequest(block_hashes=[1, 2]),
        ({"sites": ["a.b"]}, {"block_hashes": [1] * (MAX_LOOKUP_BLOCKS + 1)}, {"block_hashes": list(range(900_000))}),
        lambda d: [d.index.metrics.bad_messages.labels("lookup"), d.index.metrics.lookups.labels("bad_request")],
        _lookup_answered,
        request=True,
    ),
    "index KV events": Listener(
        lambda d: subjects.kv_events(PREFILL_SITE, "garbage-events"),
        KvEventBatch(site=PREFILL_SITE, instance="garbage-events", seq=1, ts=1.0, events=[AllBlocksCleared()]),
        (
            {"seq": 0},
            {"seq": 2**64 - 1},
            {"instance": "a.b"},
            {"ts": NAN},
            {"events": [{"type": "kv.cleared.v1"}] * (MAX_BATCH_EVENTS + 1)},
            {"events": [{"type": "kv.snapshot.v1", "stored": [{"block_hashes": [1] * (MAX_BATCH_HASHES + 1)}]}]},
        ),
        lambda d: [d.index.metrics.bad_messages.labels("event")],
        _batch_applied,
        stream=True,
    ),
    "decode jobs": Listener(
        lambda d: subjects.decode_jobs(DECODE_SITE, DECODE),
        DECODE_JOB,
        (
            {"reply_subject": "a.*"},
            {"reply_subject": "x" * 5000},
            {"timeout_s": NAN},
            {"max_tokens": -5},
            {"lease_s": INF},
            {"sampling": {"seed": -1}},
        ),
        lambda d: [d.decode.metrics.bad_messages.labels("decode_job"), d.decode.metrics.jobs.labels("bad_request")],
        _request_served(),
        request=True,
    ),
    "decode resend": Listener(
        lambda d: subjects.decode_resend(DECODE_SITE, DECODE),
        ResendTokens(request_id="garbage", from_index=0),
        ({"from_index": -1}, {"request_id": "r" * (MAX_STRING_CHARS + 1)}),
        lambda d: [d.decode.metrics.bad_messages.labels("resend")],
        _request_served(),
        request=True,
    ),
    "gateways cancel": Listener(
        lambda d: subjects.JOB_CANCEL,
        JobCancel(request_id="garbage"),
        ({"reason": "r" * (MAX_STRING_CHARS + 1)},),
        lambda d: [d.decode.metrics.bad_messages.labels("cancel"), d.prefill.metrics.bad_messages.labels("cancel")],
        _request_served(),
    ),
    "decode KV control": Listener(
        lambda d: subjects.kv_control(DECODE_SITE, DECODE),
        KvStatusRequest(transfer_id="tgarbage"),
        ({"wait_s": NAN}, {"round": -1}),
        lambda d: [d.decode.jetstream.bad_messages.labels("kv_control")],
        _request_served("jetstream"),
        request=True,
    ),
    "decode snapshot request": Listener(
        lambda d: subjects.kv_snapshot_request(DECODE_SITE, DECODE),
        _snapshot_request(DECODE_SITE, DECODE),
        ({"instance": "another"}, {"expected_seq": -1}),
        lambda d: [d.decode.events.bad_messages.labels("snapshot_request")],
        _snapshot_served(lambda d: d.decode.events),
    ),
    "prefill snapshot request": Listener(
        lambda d: subjects.kv_snapshot_request(PREFILL_SITE, PREFILL),
        _snapshot_request(PREFILL_SITE, PREFILL),
        ({"site": DECODE_SITE}, {"received_seq": INF}),
        lambda d: [d.prefill.instances[PREFILL].events.bad_messages.labels("snapshot_request")],
        _snapshot_served(lambda d: d.prefill.instances[PREFILL].events),
    ),
    "prefill cluster jobs": Listener(
        lambda d: subjects.prefill_jobs(PREFILL_SITE, CLUSTER),
        PREFILL_JOB,
        (
            {"status_subject": "a b"},
            {"timeout_s": NAN},
            {"skip_blocks": -1},
            {"destination": {"site": "x", "port": -1}},
        ),
        lambda d: [d.prefill.metrics.bad_messages.labels("prefill_job"), d.prefill.metrics.jobs.labels("bad_request")],
        _request_served(),
        request=True,
    ),
    "prefill instance jobs": Listener(
        lambda d: subjects.prefill_instance_jobs(PREFILL_SITE, CLUSTER, PREFILL),
        PREFILL_JOB,
        ({"status_subject": "x" * 600}, {"timeout_s": -INF}),
        lambda d: [d.prefill.metrics.bad_messages.labels("prefill_job"), d.prefill.metrics.jobs.labels("bad_request")],
        _request_served(),
        request=True,
    ),
    "prefill link share": Listener(
        lambda d: subjects.link_share(PREFILL_SITE, DECODE_SITE),
        SHARE,
        ({"demand_gbps": NAN}, {"interval_s": 0.0}, {"src_site": "elsewhere"}, {"dst_site": "a.b"}, {"process": ""}),
        lambda d: [d.prefill.links._shares.bad_messages.labels("link_share")],  # the gateway's KvLinks owns them
        _request_served("jetstream"),
    ),
}


def garbage(listener: Listener, max_payload: int) -> list[bytes]:
    """The matrix: no msgpack, other types, another Struct, an unknown version, a missing field, lies, oversized."""
    own = msgspec.to_builtins(listener.message)
    required = next(f.encode_name for f in msgspec.structs.fields(listener.message) if f.required)
    shapes: list[object] = [{}, [1, 2, 3], 7, "text", None]
    versions = [own | {"type": own["type"].replace(".v1", ".v2")}, {k: v for k, v in own.items() if k != required}]
    return [
        b"\xc1 no msgpack",
        *(msgspec.msgpack.encode(shape) for shape in shapes),
        encode(AllBlocksCleared()),
        *(msgspec.msgpack.encode(v) for v in versions),
        *(msgspec.msgpack.encode(_deep_merge(own, lie)) for lie in listener.lies),
        b"\xc1" * (max_payload - 1024),
    ]


def _deep_merge(base: dict, lie: dict) -> dict:
    return base | {k: _deep_merge(base[k], v) if isinstance(v, dict) else v for k, v in lie.items()}


def _counts(counters: list) -> list[float]:
    return [c._value.get() for c in counters]


@pytest.mark.parametrize("name", list(LISTENERS))
async def test_garbage_is_counted_and_refused_and_the_service_still_serves(
    deployment: Deployment, name: str, caplog: pytest.LogCaptureFixture
):
    """Every malformed, mistyped, wrong-version, lying or oversized message is counted once (a request is answered
    ``bad_request``) and logged at most once per kind, nothing dies, and a good message after them is served."""
    d, listener = deployment, LISTENERS[name]
    caplog.set_level(logging.WARNING, logger="libs.common.handling")
    payloads = garbage(listener, d.nc.max_payload)
    subject = listener.subject(d)
    counters = listener.counters(d)
    before = _counts(counters)
    for data in payloads:
        if listener.request:
            reply = msgspec.msgpack.decode((await d.nc.request(subject, data, timeout=10)).data)
            assert (reply["type"], reply["code"]) == ("error.v1", "bad_request"), (reply, data[:80])
        elif listener.stream:
            await d.nc.jetstream().publish(subject, data, timeout=10)
        else:
            await d.nc.publish(subject, data)
    await settle(d.nc)
    expected = [b + len(payloads) for b in before]
    await eventually(lambda: _true(_counts(counters) == expected), what=f"{len(payloads)} refusals counted")
    await listener.served(d)
    assert _counts(counters) == expected, "a good message was counted as bad"
    lines = [r for r in caplog.records if r.getMessage() == "malformed message refused"]
    assert len(lines) <= len(counters), f"{len(lines)} log lines for {len(payloads)} refusals: not throttled"


async def test_a_failing_handler_answers_internal_and_its_subscription_goes_on(deployment: Deployment):
    """A handler's unexpected failure is answered ``internal`` at once, and the subscription's next message is served."""
    handled: list[bytes] = []

    async def flaky(msg) -> None:
        if msg.data == b"boom":
            raise RuntimeError("a handler bug")
        handled.append(msg.data)
        await msg.respond(b"ok")

    nc = deployment.nc
    async with BusService(nc, stop_timeout_s=5) as service:
        await service.subscribe("garbage.flaky", flaky)
        await settle(nc)
        reply = msgspec.msgpack.decode((await nc.request("garbage.flaky", b"boom", timeout=5)).data)
        assert (reply["type"], reply["code"]) == ("error.v1", "internal")
        assert (await nc.request("garbage.flaky", b"fine", timeout=5)).data == b"ok"
        assert handled == [b"fine"]


async def test_a_newer_sender_s_extra_fields_are_read_as_v1(deployment: Deployment):
    """Schemas grow by fields with defaults: a v1 message carrying a field this reader does not know is served."""
    newer = msgspec.to_builtins(KvLookupRequest(block_hashes=[1, 2])) | {"added_later": [1, "x"]}
    reply = await deployment.nc.request(subjects.KV_LOOKUP, msgspec.msgpack.encode(newer), timeout=5)
    assert isinstance(kv_lookup_result_decoder.decode(reply.data), KvLookupReply)


async def test_garbage_on_a_transfer_subject_nobody_reads_leaves_jetstream_transfers_alone(deployment: Deployment):
    """Garbage in the decode site's KV stream, on a transfer no receiver pulls, ages out and blocks no transfer."""
    d = deployment
    subject = subjects.kv_transfer(DECODE_SITE, DECODE, "tnobody")
    for data in garbage(LISTENERS["decode KV control"], d.nc.max_payload):
        await d.nc.jetstream().publish(subject, data, timeout=10)
    info = await d.nc.jetstream().stream_info(subjects.kv_transfer_stream(DECODE_SITE))
    assert info.config.max_age == d.decode.jetstream.config.max_message_age_s
    await _request_served("jetstream")(d)


async def test_the_router_serves_a_completion_end_to_end_after_the_garbage(deployment: Deployment):
    """After every subject's garbage, a completion through the router's HTTP API runs both legs and streams tokens."""
    d = deployment
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        http.post(f"{d.router.url}/v1/completions", json=body) as resp,
    ):
        out = await resp.json()
    assert resp.status == 200, out
    assert out["usage"]["completion_tokens"] == 4


async def test_a_large_snapshot_is_published_as_batches_the_index_takes():
    """A snapshot over the batch limits leaves as a reset and its chains, in order, every batch within the limits."""
    chains = [BlocksStored(block_hashes=list(range(1, 40_001)), parent_hash=7)]
    chains += [BlocksStored(block_hashes=[10**6 + i]) for i in range(5000)]
    batches = within_limits([AllBlocksCleared(), KvSnapshot(stored=chains), BlocksEvicted(block_hashes=[3])])
    assert len(batches) > 1 and all(batch_size(b) <= (MAX_BATCH_EVENTS, MAX_BATCH_HASHES) for b in batches)
    flat = [event for batch in batches for event in batch]
    assert flat[:2] == [AllBlocksCleared(), KvSnapshot(stored=[])] and flat[-1] == BlocksEvicted(block_hashes=[3])
    stored = [event for event in flat if isinstance(event, BlocksStored)]
    assert [h for event in stored for h in event.block_hashes] == [h for c in chains for h in c.block_hashes]
    assert [e.parent_hash for e in stored[:4]] == [7, MAX_BATCH_HASHES, 2 * MAX_BATCH_HASHES, None]
    assert within_limits([KvSnapshot(stored=chains[1:3])]) == [[KvSnapshot(stored=chains[1:3])]]  # small: unchanged


async def test_a_lookup_that_fails_unexpectedly_is_answered_internal(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
):
    """A lookup task that raises what no handler expects (a store bug) answers ``internal`` at once; the next is served."""
    d, real = deployment, deployment.index.store.lookup

    async def broken_once(*args, **kwargs):
        monkeypatch.setattr(d.index.store, "lookup", real)
        raise RuntimeError("a store bug")

    monkeypatch.setattr(d.index.store, "lookup", broken_once)
    reply = await d.nc.request(subjects.KV_LOOKUP, encode(KvLookupRequest(block_hashes=[1, 2])), timeout=5)
    assert kv_lookup_result_decoder.decode(reply.data) == ErrorReply(
        code="internal", message="the handler failed: RuntimeError"
    )
    await _lookup_answered(d)


async def test_a_message_on_no_stream_of_the_mailbox_is_counted_not_queued(deployment: Deployment):
    """A well-formed message under the router's inbox but on neither a token nor a status stream is refused."""
    d = deployment
    counter = d.router.mailbox.bad_messages.labels("mailbox")
    before = counter._value.get()
    chunk = encode(TokenChunk(request_id=JOB, index=0, token_ids=[7]))
    await d.nc.publish(f"{d.router.mailbox.prefix}.bogus.{JOB}", chunk)
    await settle(d.nc)
    await eventually(lambda: _true(counter._value.get() == before + 1), what="the message counted")
    assert d.job_queue.empty()


async def test_a_flood_of_snapshot_requests_costs_one_snapshot_a_second(deployment: Deployment):
    """Valid snapshot requests as fast as they come are answered by at most one snapshot per SNAPSHOT_EVERY_S."""
    d, publisher = deployment, deployment.decode.events
    request = encode(_snapshot_request(publisher.site, publisher.instance))
    subject = subjects.kv_snapshot_request(publisher.site, publisher.instance)
    before, start = publisher.published_batches, time.monotonic()
    for _ in range(200):
        await d.nc.publish(subject, request)
    await settle(d.nc)
    await eventually(lambda: _true(publisher._deferred is not None and publisher._deferred.done()), what="answered")
    snapshots = publisher.published_batches - before  # the cache is small: one batch a snapshot
    assert 1 <= snapshots <= 2 + (time.monotonic() - start) / SNAPSHOT_EVERY_S, snapshots


async def test_a_malformed_reply_is_a_typed_error_for_the_caller(deployment: Deployment):
    """A client asking over the bus gets a typed ``internal`` error for a reply that does not decode, not a crash."""
    nc = deployment.nc

    async def garbled(msg) -> None:
        await msg.respond(b"\xc1 no msgpack")

    sub = await nc.subscribe("garbage.garbled", cb=garbled)
    try:
        with pytest.raises(PrfaasError) as caught:
            await ask(nc, "garbage.garbled", KvLookupRequest(block_hashes=[1]), kv_lookup_result_decoder, 5, "garbled")
        assert caught.value.code == "internal" and "malformed reply" in caught.value.message
    finally:
        await sub.unsubscribe()


async def test_the_largest_seed_a_client_may_send_is_not_refused(deployment: Deployment):
    """The number check stops at msgpack's end: a seed of 2**64 - 1 (the router's HTTP limit) still decodes."""
    out = await deployment.caller.request(
        PROMPT, DECODE, model=MODEL, max_tokens=4, sampling=Sampling(temperature=1.0, seed=2**64 - 1), timeout_s=20
    )
    assert len(out.tokens) == 4 and not isinstance(out.final, ErrorReply), out.final
