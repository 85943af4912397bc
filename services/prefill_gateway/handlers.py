"""One coroutine per subject: prefill jobs (accepted or refused at once) and cancellations."""

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
    ErrorReply,
    PrefillAccepted,
    PrefillJob,
    encode,
    job_cancel_decoder,
    prefill_job_decoder,
)
from libs.common.telemetry import extract_context
from libs.engine.backends import check_skip, checked_prompt
from services.prefill_gateway.instance import PrefillInstance, QueuedJob
from services.prefill_gateway.job import PrefillRun, run_prefill

if TYPE_CHECKING:
    from services.prefill_gateway.service import PrefillGatewayService

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


def _validate(svc: PrefillGatewayService, job: PrefillJob, instance: PrefillInstance) -> None:
    """``BadRequest`` for a job no instance of this gateway can serve."""
    dest = job.destination
    try:
        subjects.token(job.transfer_id, "transfer id")
        subjects.token(dest.site, "destination site")
        subjects.token(dest.instance, "destination instance")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if not job.request_id:
        raise BadRequest("a prefill job needs a request_id")
    if dest.transport not in svc.senders:
        raise BadRequest(f"transport {dest.transport!r} is not served here")
    if dest.transport == "tcp" and (not dest.host or not 0 < dest.port < 65536):
        raise BadRequest(f"a tcp destination needs a host and a port, got {dest.host!r}:{dest.port}")
    if job.model != instance.backend.model_name:
        raise BadRequest(f"unknown model {job.model!r}: this cluster serves {instance.backend.model_name!r}")
    if job.timeout_s <= 0:
        raise BadRequest(f"timeout_s must be > 0, got {job.timeout_s}")


def _choose(svc: PrefillGatewayService, hashes: list[int], named: str | None) -> PrefillInstance:
    """The named instance, or the one a job would start soonest on (more cached blocks break ties)."""
    if named is not None:
        return svc.instances[named]
    return min(svc.instances.values(), key=lambda i: (i.expected_wait_s(), len(i.queue), -i.backend.cache.usable_blocks(hashes)))


async def accept(svc: PrefillGatewayService, job: PrefillJob, named: str | None) -> PrefillAccepted:
    """Queue ``job`` on an instance and start it, or refuse with a typed error."""
    existing = svc.runs.get(job.request_id)
    if existing is not None:
        if existing.job.transfer_id != job.transfer_id:
            raise BadRequest(f"request {job.request_id} already runs with transfer {existing.job.transfer_id}")
        instance = existing.instance
        return PrefillAccepted(request_id=job.request_id, site=svc.config.site, instance=instance.name,
                               queue_position=instance.queue.index(existing.queued), expected_wait_s=0.0, cached_blocks=0)
    any_instance = next(iter(svc.instances.values()))
    _validate(svc, job, any_instance)
    backend = any_instance.backend
    tokens, hashes = await checked_prompt(backend, job.prompt_tokens)
    check_skip(len(tokens), job.skip_blocks, backend.block_size)
    if svc.draining:
        raise NoCapacity("the prefill gateway is draining")
    instance = _choose(svc, hashes, named)
    if len(instance.queue) >= svc.config.queue_limit:
        raise NoCapacity(f"instance {instance.name} has {len(instance.queue)} jobs queued (limit {svc.config.queue_limit})")
    bs = backend.block_size
    cached = min(instance.backend.cache.usable_blocks(hashes), (len(tokens) - 1) // bs)
    ahead, wait_s = len(instance.queue), instance.expected_wait_s()
    now = time.monotonic()
    run = PrefillRun(
        job=job,
        instance=instance,
        tokens=tokens,
        hashes=hashes,
        queued=QueuedJob(len(tokens) - cached * bs, cached * bs),
        deadline=now + job.timeout_s,
        trace_context=trace.set_span_in_context(trace.get_current_span()),
        received_at=now,
    )
    svc.started(run, run_prefill(svc, run))
    return PrefillAccepted(request_id=job.request_id, site=svc.config.site, instance=instance.name,
                           queue_position=ahead, expected_wait_s=wait_s, cached_blocks=cached)


async def handle_job(svc: PrefillGatewayService, msg: Msg, named: str | None = None) -> None:
    """Answer a ``PrefillJob`` at once with ``PrefillAccepted`` or an ``ErrorReply`` (no_capacity, bad_request)."""
    with tracer.start_as_current_span("prefill_gateway.accept", context=extract_context(msg.headers)) as span:
        try:
            try:
                job = prefill_job_decoder.decode(msg.data)
            except msgspec.DecodeError as e:
                svc.metrics.bad_messages.labels("prefill_job").inc()
                raise BadRequest(f"malformed prefill job: {e}") from None
            span.set_attribute("prfaas.request_id", job.request_id)
            reply: PrefillAccepted | ErrorReply = await accept(svc, job, named)
        except PrfaasError as e:
            svc.metrics.jobs.labels(e.code).inc()
            log.info("prefill job refused", extra={"code": e.code, "error": e.message})
            reply = ErrorReply(code=e.code, message=e.message)
        if msg.reply:
            try:
                await msg.respond(encode(reply))
            except nats.errors.Error as e:
                log.warning("prefill reply not sent", extra={"error": repr(e)})


async def handle_cancel(svc: PrefillGatewayService, msg: Msg) -> None:
    """Stop a job held here: its compute stops and its transfer is aborted (others ignore the cancel)."""
    try:
        cancel = job_cancel_decoder.decode(msg.data)
    except msgspec.DecodeError:
        svc.metrics.bad_messages.labels("cancel").inc()
        return
    if svc.cancel(cancel.request_id, cancel.reason or "cancelled"):
        log.info("prefill job cancelled", extra={"request_id": cancel.request_id, "reason": cancel.reason})
