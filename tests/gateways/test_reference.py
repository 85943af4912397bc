"""Reference model across two sites: the tokens of monolithic generation, over TCP and JetStream, with a held prefix."""

from __future__ import annotations

import asyncio
import time

import pytest
from opentelemetry import trace

from libs.common import subjects
from libs.common.errors import BadRequest
from libs.common.hashing import hash_list
from libs.common.messages import (
    BlocksStored,
    DecodeFinished,
    DecodeJob,
    JobCancel,
    KvSnapshot,
    KvSnapshotRequest,
    PrefillFinished,
    PrefillJob,
    Sampling,
    encode,
    kv_event_batch_decoder,
)
from libs.engine.generate import generate
from libs.engine.model import ReferenceModel
from libs.engine.tokenizer import ByteTokenizer
from services.decode_gateway.client import DecodeGatewayClient
from services.prefill_gateway.client import PrefillGatewayClient
from tests.gateways.conftest import caller_for

CLUSTER, PREFILL, DECODE = "ref", "ref-p0", "ref-d0"
TEXT = "Prefill runs in one datacenter, decode in another; the KV cache streams between them. "
MODEL = ReferenceModel()
KV_BYTES_PER_TOKEN = MODEL.config.attn_kv_bytes_per_token


def _prompt(tag: str, repeat: int = 4) -> list[int]:
    return ByteTokenizer().encode(f"[{tag}] " + TEXT * repeat)


@pytest.fixture(scope="module")
def reference_pair(module_gateways, otlp):
    """A reference prefill gateway at the PrfaaS site and a reference decode gateway at the PD site (traced)."""
    receiver, _ = otlp
    tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}

    async def start() -> None:
        await asyncio.gather(
            module_gateways.prefill(CLUSTER, PREFILL, env=tracing), module_gateways.decode(DECODE, env=tracing)
        )

    asyncio.run(start())
    return module_gateways


@pytest.mark.parametrize(
    ("transport", "sampling", "codec"),
    [
        ("tcp", Sampling(), None),
        ("jetstream", Sampling(temperature=0.8, top_p=0.9, seed=7, ignore_eos=True), None),
        ("tcp", Sampling(temperature=0.8, seed=11, ignore_eos=True), "zstd"),
    ],
)
async def test_tokens_match_monolithic_generation(reference_pair, sites, transport, sampling, codec):
    """Prefill at one site, transfer, decode at the other: exactly generate()'s tokens (greedy, seeded, zstd)."""
    prompt = _prompt(f"identity {transport} {codec}")
    async with caller_for(sites, CLUSTER) as caller:
        out = await caller.request(
            prompt, DECODE, model="reference", max_tokens=24, sampling=sampling, transport=transport, codec=codec
        )
    assert out.tokens == generate(MODEL, prompt, 24, sampling)
    assert isinstance(out.final, DecodeFinished) and out.final.finish_reason == "length"
    assert (out.final.prompt_tokens, out.final.completion_tokens, out.final.held_tokens) == (len(prompt), 24, 0)
    assert isinstance(out.status, PrefillFinished)
    whole = sum(spec.nbytes for spec in MODEL_PARTS(len(prompt)))
    assert out.status.payload_bytes == whole
    assert out.final.received_bytes == out.status.sent_bytes <= whole  # wire bytes (zstd: fewer), no resends
    t = out.final.timings
    # the receiver's own readings of first and last byte, however short the transfer
    assert 0 < t.kv_wait_s and 0 < t.transfer_s and t.kv_wait_s + t.transfer_s <= t.first_token_s <= t.total_s


def MODEL_PARTS(n_tokens: int, skip_blocks: int = 0):  # noqa: N802 - reads like the backend's own plan
    from libs.engine.state import plan_parts

    return plan_parts(MODEL.config, n_tokens, skip_blocks * MODEL.config.block_size)


async def test_a_shared_prefix_sends_only_the_missing_blocks(reference_pair, sites):
    """A second prompt sharing 4 blocks sends K/V of the rest only (plus linear states) and still matches generate()."""
    first = _prompt("shared prefix")[:320]  # 5 blocks
    second = first[:256] + ByteTokenizer().encode(" but this request continues differently from the first.", bos=False)
    events = await sites.decode_nc.subscribe(subjects.kv_events("dc-pd", DECODE))
    async with caller_for(sites, CLUSTER) as caller:
        one = await caller.request(first, DECODE, model="reference", max_tokens=8)
        stored = []
        async with asyncio.timeout(5):
            while hash_list(first)[0] not in stored:
                batch = kv_event_batch_decoder.decode((await events.next_msg(timeout=5)).data)
                stored += [
                    h
                    for e in batch.events
                    if isinstance(e, BlocksStored) and e.kind == "attn_kv"
                    for h in e.block_hashes
                ]
        assert stored == hash_list(first)  # the decode instance announces what it received
        two = await caller.request(second, DECODE, model="reference", max_tokens=24)
    assert one.tokens == generate(MODEL, first, 8)
    assert two.reservation.held_blocks == 4 and two.final.held_tokens == 256
    assert two.tokens == generate(MODEL, second, 24)
    assert two.status.payload_bytes == sum(s.nbytes for s in MODEL_PARTS(len(second), 4))
    assert two.status.cached_tokens == 256  # the prefill instance resumed from its own cache too
    whole = sum(s.nbytes for s in MODEL_PARTS(len(second)))
    assert whole - two.status.payload_bytes == 256 * KV_BYTES_PER_TOKEN  # the held blocks' K/V stayed home


async def test_bad_jobs_are_refused_at_once(reference_pair, sites):
    """Unknown model, a prompt over the model's limit, a malformed job: BadRequest from both legs, without waiting."""
    decode, prefill = DecodeGatewayClient(sites.decode_nc), PrefillGatewayClient(sites.decode_nc)
    too_long = [65] * (MODEL.config.max_prompt_tokens + 1)
    common = {
        "request_id": "bad",
        "transfer_id": "tbad",
        "max_tokens": 4,
        "reply_subject": "nowhere",
        "prefill_site": "dc-prfaas",
    }
    start = time.monotonic()
    with pytest.raises(BadRequest, match="unknown model"):
        await decode.reserve("dc-pd", DECODE, DecodeJob(model="gpt-17", prompt_tokens=[1, 2], **common))
    with pytest.raises(BadRequest, match="limit"):
        await decode.reserve("dc-pd", DECODE, DecodeJob(model="reference", prompt_tokens=too_long, **common))
    dest = await caller_destination(sites)
    with pytest.raises(BadRequest, match="limit"):
        await prefill.submit(
            "dc-prfaas",
            CLUSTER,
            PrefillJob(
                request_id="bad", transfer_id="tbad", model="reference", prompt_tokens=too_long, destination=dest
            ),
        )
    with pytest.raises(BadRequest, match="skip_blocks"):
        await prefill.submit(
            "dc-prfaas",
            CLUSTER,
            PrefillJob(
                request_id="bad",
                transfer_id="tbad",
                model="reference",
                prompt_tokens=[1] * 100,
                destination=dest,
                skip_blocks=2,
            ),
        )
    reply = await sites.decode_nc.request(subjects.decode_jobs("dc-pd", DECODE), b"\x93garbage", timeout=2)
    assert b"bad_request" in reply.data
    assert time.monotonic() - start < 5  # answered, not timed out (each leg's deadline is 2 s)


async def caller_destination(sites):
    """A real decode destination (what a reservation would give), read from the decode instance's heartbeat."""
    from libs.common.messages import KvDestination, instance_load_decoder

    sub = await sites.decode_nc.subscribe(subjects.load("dc-pd", DECODE))
    load = instance_load_decoder.decode((await sub.next_msg(timeout=5)).data)
    await sub.unsubscribe()
    return KvDestination(site="dc-pd", instance=DECODE, host=load.tcp_host, port=load.tcp_port)


async def test_cancel_stops_decoding_and_frees_the_slot(reference_pair, sites):
    """A JobCancel mid-decode ends the stream with finish_reason cancelled well before max_tokens."""
    prompt = _prompt("cancel", 1)
    async with caller_for(sites, CLUSTER) as caller:
        first_token = asyncio.Event()
        request = asyncio.create_task(
            caller.request(
                prompt,
                DECODE,
                model="reference",
                max_tokens=5000,
                request_id="cancel-1",
                sampling=Sampling(ignore_eos=True),
                first_token=first_token,
            )
        )
        async with asyncio.timeout(30):
            await first_token.wait()
        await sites.decode_nc.publish(
            subjects.JOB_CANCEL, encode(JobCancel(request_id="cancel-1", reason="client gone"))
        )
        out = await request
    assert out.final.finish_reason == "cancelled"
    assert 0 < out.final.completion_tokens < 5000


async def test_every_hop_joins_the_callers_trace(reference_pair, sites, otlp):
    """The reservation, the prefill and both jobs are spans of the caller's trace (context in NATS headers)."""
    receiver, _ = otlp
    receiver.take()
    async with caller_for(sites, CLUSTER) as caller:
        with trace.get_tracer("test").start_as_current_span("router.route") as parent:
            await caller.request(_prompt("trace", 1), DECODE, model="reference", max_tokens=2)
    trace_id = format(parent.get_span_context().trace_id, "032x")
    want = {"decode_gateway.reserve", "decode_gateway.job", "prefill_gateway.accept", "prefill_gateway.job"}
    seen: set[str] = set()
    async with asyncio.timeout(10):
        while not want <= seen:
            seen |= {s.name for s in receiver.take() if s.trace_id == trace_id}
            await asyncio.sleep(0.05)  # the gateways export in batches every 50 ms


async def test_a_stop_sequence_ends_the_stream_without_its_text(reference_pair, sites):
    """A stop sequence taken from the greedy continuation ends the request there: finish_reason stop, text not sent."""
    prompt = _prompt("stop sequence", 1)
    free = generate(MODEL, prompt, 40, Sampling(ignore_eos=True))
    stop = ByteTokenizer().decode(free[20:23])
    sampling = Sampling(stop=(stop,), ignore_eos=True)
    async with caller_for(sites, CLUSTER) as caller:
        out = await caller.request(prompt, DECODE, model="reference", max_tokens=40, sampling=sampling)
    assert out.final.finish_reason == "stop"
    assert out.tokens == generate(MODEL, prompt, 40, sampling)
    assert stop not in ByteTokenizer().decode(out.tokens)


async def test_the_index_gets_a_snapshot_when_it_asks(reference_pair, sites):
    """A KvSnapshotRequest (after a gap the index saw) is answered with a numbered batch holding a KvSnapshot."""
    prompt = _prompt("snapshot", 2)[:192]
    events = await sites.decode_nc.subscribe(subjects.kv_events("dc-pd", DECODE))
    async with caller_for(sites, CLUSTER) as caller:
        await caller.request(prompt, DECODE, model="reference", max_tokens=2)
    stored = kv_event_batch_decoder.decode((await events.next_msg(timeout=5)).data)
    request = KvSnapshotRequest(site="dc-pd", instance=DECODE, expected_seq=stored.seq, received_seq=stored.seq + 5)
    await sites.decode_nc.publish(subjects.kv_snapshot_request("dc-pd", DECODE), encode(request))
    batch = kv_event_batch_decoder.decode((await events.next_msg(timeout=5)).data)
    assert batch.seq == stored.seq + 1 and isinstance(batch.events[0], KvSnapshot)
    held = {h for s in batch.events[0].stored if s.kind == "attn_kv" for h in s.block_hashes}
    assert set(hash_list(prompt)) <= held
