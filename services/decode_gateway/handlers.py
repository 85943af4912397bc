"""One coroutine per subject: decode jobs (answered with a reservation at once) and cancellations."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import msgspec
import nats.errors
from nats.aio.msg import Msg
from opentelemetry import trace

from libs.common import subjects
from libs.common.errors import BadRequest, NoCapacity, PrfaasError
from libs.common.messages import (
    DecodeJob,
    DecodeReservation,
    ErrorReply,
    KvDestination,
    decode_job_decoder,
    encode,
    job_cancel_decoder,
)
from libs.common.telemetry import extract_context
from libs.engine.backends import checked_prompt
from services.decode_gateway.job import run_job
from services.decode_gateway.reservations import Reservation, transfer_bytes_bound

if TYPE_CHECKING:
    from services.decode_gateway.service import DecodeGatewayService

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


def _validate(svc: DecodeGatewayService, job: DecodeJob) -> None:
    """``BadRequest`` for a job this instance can never serve."""
    try:
        subjects.token(job.transfer_id, "transfer id")
        subjects.token(job.prefill_site, "prefill site")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if not job.request_id or not job.reply_subject:
        raise BadRequest("a decode job needs a request_id and a reply_subject")
    if job.model != svc.backend.model_name:
        raise BadRequest(f"unknown model {job.model!r}: this instance serves {svc.backend.model_name!r}")
    if job.transport not in svc.config.transports:
        raise BadRequest(f"transport {job.transport!r} is not served here (have {', '.join(svc.config.transports)})")
    if job.max_tokens < 1 or job.timeout_s <= 0 or job.lease_s < 0:
        raise BadRequest(f"max_tokens must be >= 1, timeout_s > 0 and lease_s >= 0, got "
                         f"{job.max_tokens}, {job.timeout_s}, {job.lease_s}")


def _reply(svc: DecodeGatewayService, res: Reservation) -> DecodeReservation:
    cfg = svc.config
    host, port = cfg.advertise_by_site.get(res.job.prefill_site, (cfg.host, svc.tcp_port))
    return DecodeReservation(
        request_id=res.job.request_id,
        transfer_id=res.job.transfer_id,
        destination=KvDestination(site=cfg.site, instance=cfg.instance, transport=res.job.transport, host=host, port=port),
        held_blocks=res.held_blocks,
        reserved_bytes=res.reserved_bytes,
        lease_s=res.lease_s,
    )


async def reserve(svc: DecodeGatewayService, job: DecodeJob) -> Reservation:
    """Hold a slot, receiver bytes and the prompt's cached prefix for ``job``, or refuse with a typed error."""
    existing = svc.reservations.get(job.request_id)
    if existing is not None:
        if existing.job.transfer_id != job.transfer_id:
            raise BadRequest(f"request {job.request_id} is already reserved for transfer {existing.job.transfer_id}")
        return existing  # a resent job gets the same reservation
    _validate(svc, job)
    backend = svc.backend
    tokens, hashes = await checked_prompt(backend, job.prompt_tokens)
    if svc.draining:
        raise NoCapacity("the decode instance is draining")
    if svc.free_slots() == 0:
        raise NoCapacity(f"all {svc.max_batch} decode slots are reserved or decoding")
    n, bs = len(tokens), backend.block_size
    held = min(backend.cache.leading_blocks("attn_kv", hashes), (n - 1) // bs)
    need = transfer_bytes_bound(backend.plan_parts(n, held))
    if need > svc.config.max_transfer_bytes:
        raise NoCapacity(f"the transfer may need {need} bytes, over the per-transfer limit {svc.config.max_transfer_bytes}")
    free = svc.free_kv_bytes()
    if need > free:
        raise NoCapacity(f"the transfer may need {need} bytes; {free} of {svc.config.kv_memory_bytes} are free")
    now = time.monotonic()
    res = Reservation(
        job=job,
        tokens=tokens,
        held_hashes=hashes[:held],
        reserved_bytes=need,
        lease_s=job.lease_s or svc.config.lease_s,
        deadline=now + job.timeout_s,
        trace_context=trace.set_span_in_context(trace.get_current_span()),
        reserved_at=now,
    )
    svc.hold(res)
    svc.start_job(res, run_job(svc, res))
    return res


async def handle_job(svc: DecodeGatewayService, msg: Msg) -> None:
    """Answer a ``DecodeJob`` at once: a ``DecodeReservation``, or ``ErrorReply`` (no_capacity, bad_request)."""
    with tracer.start_as_current_span("decode_gateway.reserve", context=extract_context(msg.headers)) as span:
        try:
            try:
                job = decode_job_decoder.decode(msg.data)
            except msgspec.DecodeError as e:
                svc.metrics.bad_messages.labels("decode_job").inc()
                raise BadRequest(f"malformed decode job: {e}") from None
            span.set_attribute("prfaas.request_id", job.request_id)
            res = await reserve(svc, job)
            span.set_attribute("prfaas.held_blocks", res.held_blocks)
            reply: DecodeReservation | ErrorReply = _reply(svc, res)
        except PrfaasError as e:
            svc.metrics.jobs.labels(e.code).inc()
            log.info("decode job refused", extra={"code": e.code, "error": e.message})
            reply = ErrorReply(code=e.code, message=e.message)
        if msg.reply:
            try:
                await msg.respond(encode(reply))
            except nats.errors.Error as e:
                log.warning("reservation not sent", extra={"error": repr(e)})


async def handle_cancel(svc: DecodeGatewayService, msg: Msg) -> None:
    """Stop a request held here (the cancel goes to every gateway; others ignore it)."""
    try:
        cancel = job_cancel_decoder.decode(msg.data)
    except msgspec.DecodeError:
        svc.metrics.bad_messages.labels("cancel").inc()
        return
    if svc.cancel(cancel.request_id, cancel.reason):
        log.info("request cancelled", extra={"request_id": cancel.request_id, "reason": cancel.reason})
