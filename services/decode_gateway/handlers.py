"""One coroutine per subject: decode jobs (answered with a reservation at once), resends and cancellations."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from opentelemetry import trace

from libs.common.handling import answer, check_subject, counted_refusal, decoded
from libs.common.messages import (
    DecodeJob,
    DecodeReservation,
    KvDestination,
    ResentTokens,
    decode_job_decoder,
    resend_tokens_decoder,
)
from libs.common.telemetry import extract_context
from services.decode_gateway.job import run_job

if TYPE_CHECKING:
    from services.decode_gateway.service import DecodeGatewayService

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


def _publishable_reply(job: DecodeJob) -> None:
    """``BadRequest`` unless the job's token stream can be published where it asks."""
    check_subject(job.reply_subject, "reply_subject")


async def handle_job(svc: DecodeGatewayService, msg: Msg) -> None:
    """Answer a ``DecodeJob`` at once: a ``DecodeReservation``, or ``ErrorReply`` (no_capacity, bad_request)."""

    async def reserve() -> DecodeReservation:
        job = decoded(decode_job_decoder, msg, "decode_job", svc.metrics.bad_messages, _publishable_reply)
        span.set_attribute("prfaas.request_id", job.request_id)
        res, new = await svc.book.reserve(job, draining=svc.draining)
        if new:
            svc.jobs.start(job.request_id, res, run_job(svc.job_context, res))
        span.set_attribute("prfaas.held_blocks", res.held_blocks)
        host, port = svc.config.advertise_by_site.get(job.prefill_site, (svc.config.host, svc.tcp_port))
        return DecodeReservation(
            request_id=job.request_id,
            transfer_id=job.transfer_id,
            destination=KvDestination(
                site=svc.config.site, instance=svc.config.instance, transport=job.transport, host=host, port=port
            ),
            held_blocks=res.held_blocks,
            reserved_bytes=res.reserved_bytes,
            lease_s=res.lease_s,
        )

    with tracer.start_as_current_span("decode_gateway.reserve", context=extract_context(msg.headers)) as span:
        await answer(msg, reserve, counted_refusal(svc.metrics.jobs, "decode job"))


async def handle_resend(svc: DecodeGatewayService, msg: Msg) -> None:
    """Answer a ``ResendTokens``: the request's chunks from the asked index, or ``not_found`` once it is forgotten."""

    async def resend() -> ResentTokens:
        ask = decoded(resend_tokens_decoder, msg, "resend", svc.metrics.bad_messages)
        return svc.job_context.tokens.since(ask.request_id, ask.from_index)

    await answer(msg, resend)


async def handle_cancel(svc: DecodeGatewayService, msg: Msg) -> None:
    """Stop a request held here (the cancel goes to every gateway; others ignore it)."""
    await svc.jobs.handle_cancel(msg, svc.metrics.bad_messages)
