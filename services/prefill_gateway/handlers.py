"""One coroutine per subject: prefill jobs (accepted or refused at once) and cancellations."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nats.aio.msg import Msg
from opentelemetry import trace

from libs.common.handling import answer, check_subject, counted_refusal, decoded
from libs.common.messages import PrefillAccepted, PrefillJob, prefill_job_decoder
from libs.common.telemetry import extract_context
from services.prefill_gateway.intake import admit
from services.prefill_gateway.job import run_prefill

if TYPE_CHECKING:
    from services.prefill_gateway.service import PrefillGatewayService

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)


def _publishable_status(job: PrefillJob) -> None:
    """``BadRequest`` unless the job's status, if asked for, can be published where it asks."""
    if job.status_subject:
        check_subject(job.status_subject, "status_subject")


async def handle_job(svc: PrefillGatewayService, msg: Msg, named: str | None = None) -> None:
    """Answer a ``PrefillJob`` at once with ``PrefillAccepted`` or an ``ErrorReply`` (no_capacity, bad_request)."""

    async def accept() -> PrefillAccepted:
        job = decoded(prefill_job_decoder, msg, "prefill_job", svc.metrics.bad_messages, _publishable_status)
        span.set_attribute("prfaas.request_id", job.request_id)
        run, accepted = await admit(
            job,
            named,
            instances=svc.instances,
            runs=svc.runs,
            senders=svc.senders,
            config=svc.config,
            draining=svc.draining,
        )
        if svc.runs.get(job.request_id) is not run:
            svc.queue(run, run_prefill(svc.job_context, run))
        return accepted

    with tracer.start_as_current_span("prefill_gateway.accept", context=extract_context(msg.headers)) as span:
        await answer(msg, accept, counted_refusal(svc.metrics.jobs, "prefill job"))


async def handle_cancel(svc: PrefillGatewayService, msg: Msg) -> None:
    """Stop a job held here: its compute stops and its transfer is aborted (others ignore the cancel)."""
    await svc.runs.handle_cancel(msg, svc.metrics.bad_messages)
