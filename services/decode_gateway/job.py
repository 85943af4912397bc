"""One request's life on a decode instance: wait for its KV, check it, decode, stream the tokens."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec
import nats.errors
import numpy as np
from nats.aio.client import Client as NatsClient
from opentelemetry import trace

from libs.common import subjects
from libs.common.errors import NoCapacity, PrfaasError, TransferFailed, UpstreamTimeout
from libs.common.jobs import SHUTDOWN
from libs.common.messages import DecodeFinished, DecodeTimings, ErrorReply, JobCancel, TokenChunk, encode
from libs.common.telemetry import inject_headers
from libs.engine.backends import Backend, Restored
from libs.engine.events import KvEventPublisher
from libs.kvwire import KvReceiver
from services.decode_gateway.metrics import DecodeGatewayMetrics
from services.decode_gateway.reservations import Reservation, ReservationBook
from services.decode_gateway.token_log import TokenLog

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


@dataclass(frozen=True)
class JobContext:
    """What a decode job touches: the bus, its instance's names, receiver, backend, reservations, KV events, metrics,
    and the log of the tokens it sent."""

    nc: NatsClient
    site: str
    instance: str
    receiver: KvReceiver
    backend: Backend
    book: ReservationBook
    events: KvEventPublisher
    metrics: DecodeGatewayMetrics
    tokens: TokenLog


async def run_job(svc: JobContext, res: Reservation) -> None:
    """Serve one reserved request to its end; every ending is a message on its reply subject.

    A request that ends before its KV arrived (lease, deadline, bad transfer, shutdown) also
    publishes a ``JobCancel``, so the prefill side stops computing for a slot that is gone.
    """
    job = res.job
    final: msgspec.Struct | None = None
    svc.tokens.open(job.request_id)
    with tracer.start_as_current_span("decode_gateway.job", context=res.trace_context) as span:
        span.set_attribute("prfaas.request_id", job.request_id)
        try:
            async with asyncio.timeout_at(res.deadline):
                final = await _serve(svc, res)
        except asyncio.CancelledError:
            if not res.cancel_reason:
                raise
            if res.cancel_reason == SHUTDOWN:
                final = ErrorReply(code=NoCapacity.code, message=SHUTDOWN)
            else:
                final = _finished(svc, res, "cancelled", res.generated)
        except TimeoutError:
            error = TransferFailed if res.receiving else UpstreamTimeout
            final = ErrorReply(
                code=error.code,
                message=f"request {job.request_id} not done within its {job.timeout_s:.1f}s "
                f"deadline ({'waiting for KV' if res.receiving else 'decoding'})",
            )
        except PrfaasError as e:
            final = ErrorReply(code=e.code, message=e.message, lease_s=res.expired_lease_s)
        finally:
            kv_pending = res.receiving
            if kv_pending:
                svc.receiver.abort(job.transfer_id, res.cancel_reason or "request ended")
            svc.book.release(res)
        outcome = final.finish_reason if isinstance(final, DecodeFinished) else final.code
        svc.metrics.jobs.labels(outcome).inc()
        if isinstance(final, ErrorReply):
            svc.metrics.failures.labels(final.code).inc()
            span.set_status(trace.Status(trace.StatusCode.ERROR, final.message))
            log.info(
                "decode job failed", extra={"request_id": job.request_id, "code": final.code, "error": final.message}
            )
        svc.tokens.end(job.request_id, final)
        await _publish(svc, job.reply_subject, final, inject_headers())
        if kv_pending and res.cancel_reason in ("", SHUTDOWN):  # not a JobCancel: tell the prefill side to stop
            reason = final.message if isinstance(final, ErrorReply) else "the decode side ended the request"
            await _publish(svc, subjects.JOB_CANCEL, JobCancel(request_id=job.request_id, reason=reason))


async def _publish(svc: JobContext, subject: str, msg: msgspec.Struct, headers: dict | None = None) -> None:
    try:
        await svc.nc.publish(subject, encode(msg), headers=headers)
    except (nats.errors.Error, OSError) as e:
        log.warning("reply not published", extra={"subject": subject, "error": repr(e)})


async def _serve(svc: JobContext, res: Reservation) -> DecodeFinished:
    """Receive, restore and decode; the final ``DecodeFinished``."""
    restored = await _receive(svc, res)
    svc.metrics.held_tokens.inc(res.held_blocks * svc.backend.block_size)
    ready_at = time.monotonic()
    job, first_at, index, finish = res.job, None, 0, "length"
    async for out in svc.backend.decode_restored(restored, job.max_tokens, job.sampling):
        if first_at is None:
            first_at = time.monotonic()
            svc.metrics.first_token_seconds.observe(first_at - res.reserved_at)
        res.generated += len(out.token_ids)
        if out.token_ids:
            chunk = TokenChunk(request_id=job.request_id, index=index, token_ids=out.token_ids, logprobs=out.logprobs)
            svc.tokens.add(chunk)
            await _publish(svc, job.reply_subject, chunk)
            index += 1
            svc.metrics.tokens.inc(len(out.token_ids))
        if out.finish_reason is not None:
            finish = out.finish_reason
    end = time.monotonic()
    svc.metrics.decode_seconds.observe(end - (first_at or end))
    return _finished(svc, res, finish, res.generated, ready_at, first_at or end)


async def _receive(svc: JobContext, res: Reservation) -> Restored:
    """The request's state once its transfer is complete and verified (receiver memory freed)."""
    job = res.job
    try:
        transfer = await svc.receiver.wait(job.transfer_id, timeout_s=max(0.0, res.deadline - time.monotonic()))
    except UpstreamTimeout as e:
        raise TransferFailed(e.message) from None
    res.begun_at, res.complete_at = transfer.began_at, transfer.completed_at  # the receiver's own clock readings
    svc.metrics.kv_wait_seconds.observe(res.begun_at - res.reserved_at)
    svc.metrics.transfer_seconds.observe(res.complete_at - res.begun_at)
    with transfer:
        manifest = transfer.manifest
        svc.metrics.received_bytes.labels(manifest.src_site, manifest.dst_site).inc(
            sum(p.nbytes for p in manifest.parts)
        )
        tokens = next((p.array for p in transfer.parts if p.name == "tokens"), None)
        if tokens is None or not np.array_equal(tokens, res.tokens):
            raise TransferFailed(f"transfer {job.transfer_id} carries other tokens than the job's prompt")
        res.received_bytes = svc.receiver.assembly(job.transfer_id).received_bytes  # held until released
        restored = await svc.backend.restore(job.request_id, transfer.parts, held_blocks=res.held_blocks)
    await svc.events.flush()
    return restored


def _finished(
    svc: JobContext,
    res: Reservation,
    reason: str,
    completion_tokens: int,
    ready_at: float | None = None,
    first_at: float | None = None,
) -> DecodeFinished:
    """The final message: why, usage, and where the time went (from the reservation)."""
    now = time.monotonic()
    begun = res.begun_at if res.begun_at is not None else now
    complete = res.complete_at if res.complete_at is not None else now
    return DecodeFinished(
        request_id=res.job.request_id,
        site=svc.site,
        instance=svc.instance,
        finish_reason=reason,
        prompt_tokens=len(res.job.prompt_tokens),
        completion_tokens=completion_tokens,
        held_tokens=res.held_blocks * svc.backend.block_size,
        received_bytes=res.received_bytes,
        timings=DecodeTimings(
            kv_wait_s=begun - res.reserved_at,
            transfer_s=complete - begun,
            queue_s=(ready_at if ready_at is not None else now) - complete,
            first_token_s=(first_at if first_at is not None else now) - res.reserved_at,
            total_s=now - res.reserved_at,
        ),
    )
