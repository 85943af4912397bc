"""One coroutine per subject: KV event batches, lookups, load heartbeats."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg
from opentelemetry import trace

from libs.common import subjects
from libs.common.errors import BadRequest, IndexUnavailable, PrfaasError
from libs.common.handling import answer, check_fields, decoded, decoded_load
from libs.common.messages import (
    MAX_BATCH_EVENTS,
    MAX_BATCH_HASHES,
    AllBlocksCleared,
    BlocksEvicted,
    BlocksStored,
    InstancePrefix,
    KvEventBatch,
    KvLookupReply,
    KvLookupRequest,
    KvSnapshot,
    KvSnapshotRequest,
    SitePrefix,
    batch_size,
    kv_event_batch_decoder,
    kv_lookup_request_decoder,
)
from libs.common.telemetry import extract_context
from services.kv_index.store import Op, SlotPrefix, pack_hashes

if TYPE_CHECKING:
    from services.kv_index.service import KvIndexService

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

MAX_LOOKUP_BLOCKS = 1 << 16  # a million tokens in blocks of 16: a longer lookup is refused before Redis sees it
MAX_LOOKUP_SITES = 64


def _packed(hashes: list[int]) -> bytes:
    try:
        return pack_hashes(hashes)
    except (OverflowError, ValueError) as e:
        raise BadRequest(f"block hashes must be integers in [0, 2**64): {e}") from None


def batch_ops(batch: KvEventBatch) -> tuple[list[Op], bool]:
    """Store operations for a batch, and whether it resets the instance (clear or snapshot)."""
    ops: list[Op] = []
    resets = False
    for event in batch.events:
        if isinstance(event, BlocksStored):
            ops.append(Op("S", event.kind, event.tier, _packed(event.block_hashes)))
        elif isinstance(event, BlocksEvicted):
            ops.append(Op("E", event.kind, event.tier, _packed(event.block_hashes)))
        elif isinstance(event, AllBlocksCleared):
            ops.append(Op("C"))
            resets = True
        elif isinstance(event, KvSnapshot):
            ops.append(Op("C"))
            ops += [Op("S", s.kind, s.tier, _packed(s.block_hashes)) for s in event.stored]
            resets = True
    return ops, resets


def decode_batch(data: bytes) -> KvEventBatch:
    """Decode and validate a KV event batch (``BadRequest`` if malformed)."""
    try:
        batch = kv_event_batch_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise BadRequest(f"malformed KV event batch: {e}") from None
    check_fields(batch)
    try:
        subjects.token(batch.site, "site")
        subjects.token(batch.instance, "instance")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if not 1 <= batch.seq < 2**63:  # Redis holds it as a signed 64-bit integer
        raise BadRequest(f"seq must lie in [1, 2**63), got {batch.seq}")
    events, hashes = batch_size(batch.events)
    if events > MAX_BATCH_EVENTS or hashes > MAX_BATCH_HASHES:
        raise BadRequest(f"{events} events of {hashes} block hashes: over {MAX_BATCH_EVENTS} or {MAX_BATCH_HASHES}")
    return batch


async def handle_kv_batch(svc: KvIndexService, data: bytes) -> str:
    """Apply one batch to the store; returns the outcome. Store errors propagate (caller retries)."""
    batch = decode_batch(data)
    ops, resets = batch_ops(batch)
    slot = await svc.store.slot_for(batch.site, batch.instance)
    status, last = await svc.store.apply(slot, batch.seq, ops, resets)
    svc.metrics.batches.labels(status).inc()
    if status == "ok":
        for op in ops:
            svc.metrics.block_events.labels({"S": "stored", "E": "evicted", "C": "cleared"}[op.op]).inc(
                max(1, len(op.hashes) // 8)
            )
    elif status == "gap":
        svc.metrics.sequence_gaps.inc()
        log.warning(
            "sequence gap: instance stale until snapshot",
            extra={"site": batch.site, "instance": batch.instance, "expected_seq": last + 1, "seq": batch.seq},
        )
    if status in ("gap", "stale"):
        await svc.request_snapshot(
            KvSnapshotRequest(site=batch.site, instance=batch.instance, expected_seq=last + 1, received_seq=batch.seq)
        )
    return status


async def handle_load(svc: KvIndexService, msg: Msg) -> None:
    """Record a heartbeat: the instance stays in answers for ``instance_ttl_s``."""
    load = decoded_load(msg, svc.metrics.bad_messages)
    if load is None:
        return
    try:
        slot = await svc.store.slot_for(load.site, load.instance)
        await svc.store.heartbeat(slot, time.time() + svc.config.instance_ttl_s)
    except svc.store_errors as e:
        svc.metrics.store_errors.labels("heartbeat").inc()
        log.debug("heartbeat not recorded", extra={"error": repr(e)})


def _reply(prefixes: list[SlotPrefix], names: dict[int, tuple[str, str]], req: KvLookupRequest) -> KvLookupReply:
    instances = []
    for p in prefixes:
        site, instance = names.get(p.slot, ("", ""))
        if not site or (req.sites is not None and site not in req.sites):
            continue
        instances.append(
            InstancePrefix(
                site=site,
                instance=instance,
                attn_kv_blocks=p.attn_kv_blocks,
                linear_state_blocks=p.linear_state_blocks,
                usable_blocks=p.usable_blocks,
            )
        )
    instances.sort(key=lambda i: (-i.usable_blocks, -i.attn_kv_blocks, i.site, i.instance))
    best: dict[str, SitePrefix] = {}
    for i in instances:
        if i.site not in best:
            best[i.site] = SitePrefix(
                site=i.site,
                instance=i.instance,
                usable_blocks=i.usable_blocks,
                attn_kv_blocks=i.attn_kv_blocks,
                linear_state_blocks=i.linear_state_blocks,
            )
    return KvLookupReply(blocks_total=len(req.block_hashes), instances=instances, sites=list(best.values()))


def _bounded(req: KvLookupRequest) -> None:
    """``BadRequest`` for a lookup longer than ``MAX_LOOKUP_BLOCKS`` or naming sites that are not subject tokens."""
    if len(req.block_hashes) > MAX_LOOKUP_BLOCKS:
        raise BadRequest(f"{len(req.block_hashes)} block hashes, over the limit {MAX_LOOKUP_BLOCKS}")
    if req.sites is not None:
        if len(req.sites) > MAX_LOOKUP_SITES:
            raise BadRequest(f"{len(req.sites)} sites, over the limit {MAX_LOOKUP_SITES}")
        for site in req.sites:
            subjects.token(site, "site")


async def lookup(svc: KvIndexService, req: KvLookupRequest) -> KvLookupReply:
    """Answer a lookup from the store within the configured deadline."""
    packed = _packed(req.block_hashes)
    if not packed:
        return KvLookupReply(blocks_total=0, instances=[], sites=[])
    try:
        async with asyncio.timeout(svc.config.lookup_timeout_s):
            prefixes = await svc.store.lookup(packed, time.time(), req.hybrid)
            names = await svc.store.names([p.slot for p in prefixes])
    except (TimeoutError, *svc.store_errors) as e:
        svc.metrics.store_errors.labels("lookup").inc()
        raise IndexUnavailable(f"KV index store unavailable: {e!r}") from e
    return _reply(prefixes, names, req)


async def handle_lookup(svc: KvIndexService, msg: Msg) -> None:
    """Reply to a lookup with ``KvLookupReply`` or a typed ``ErrorReply``."""
    start = time.perf_counter()
    outcome = "ok"

    async def answer_lookup() -> KvLookupReply:
        req = decoded(kv_lookup_request_decoder, msg, "lookup", svc.metrics.bad_messages, _bounded)
        span.set_attribute("prfaas.blocks", len(req.block_hashes))
        return await lookup(svc, req)

    def failed(e: PrfaasError) -> None:
        nonlocal outcome
        outcome = e.code
        log.warning("lookup failed", extra={"code": e.code, "error": e.message})

    with tracer.start_as_current_span("kv_index.lookup", context=extract_context(msg.headers)) as span:
        await answer(msg, answer_lookup, failed)
    svc.metrics.lookups.labels(outcome).inc()
    svc.metrics.lookup_seconds.observe(time.perf_counter() - start)
