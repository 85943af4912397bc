"""Taking a prefill job in: check it, choose the instance it would start soonest on, queue it, or refuse it (typed)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry import trace

from libs.common import subjects
from libs.common.errors import BadRequest, NoCapacity
from libs.common.jobs import JobTable
from libs.common.messages import PrefillAccepted, PrefillJob
from libs.engine.backends import check_skip, checked_prompt
from services.prefill_gateway.config import PrefillGatewayConfig
from services.prefill_gateway.instance import PrefillInstance, QueuedJob
from services.prefill_gateway.job import PrefillRun
from services.prefill_gateway.senders import Senders


def _validate(job: PrefillJob, instance: PrefillInstance, senders: Senders) -> None:
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
    if dest.transport not in senders:
        raise BadRequest(f"transport {dest.transport!r} is not served here")
    if dest.transport == "tcp" and (not dest.host or not 0 < dest.port < 65536):
        raise BadRequest(f"a tcp destination needs a host and a port, got {dest.host!r}:{dest.port}")
    if job.model != instance.backend.model_name:
        raise BadRequest(f"unknown model {job.model!r}: this cluster serves {instance.backend.model_name!r}")
    if job.timeout_s <= 0:
        raise BadRequest(f"timeout_s must be > 0, got {job.timeout_s}")


def _choose(instances: Mapping[str, PrefillInstance], hashes: list[int], named: str | None) -> PrefillInstance:
    """The named instance, or the one a job would start soonest on (more cached blocks break ties)."""
    if named is not None:
        return instances[named]
    return min(
        instances.values(), key=lambda i: (i.expected_wait_s(), len(i.queue), -i.backend.cache.usable_blocks(hashes))
    )


async def admit(
    job: PrefillJob,
    named: str | None,
    *,
    instances: Mapping[str, PrefillInstance],
    runs: JobTable[PrefillRun],
    senders: Senders,
    config: PrefillGatewayConfig,
    draining: bool,
) -> tuple[PrefillRun, PrefillAccepted]:
    """The run of ``job`` (the existing one for a resent job) and its acceptance, or a typed refusal."""
    existing = runs.get(job.request_id)
    if existing is not None:
        if existing.job.transfer_id != job.transfer_id:
            raise BadRequest(f"request {job.request_id} already runs with transfer {existing.job.transfer_id}")
        instance = existing.instance
        queued = [i for i, q in enumerate(instance.queue) if q is existing.queued]  # none once its compute began
        return existing, PrefillAccepted(
            request_id=job.request_id,
            site=config.site,
            instance=instance.name,
            queue_position=queued[0] if queued else 0,
            expected_wait_s=0.0,
            cached_blocks=0,
        )
    any_instance = next(iter(instances.values()))
    _validate(job, any_instance, senders)
    backend = any_instance.backend
    tokens, hashes = await checked_prompt(backend, job.prompt_tokens)
    check_skip(len(tokens), job.skip_blocks, backend.block_size)
    if draining:
        raise NoCapacity("the prefill gateway is draining")
    instance = _choose(instances, hashes, named)
    if len(instance.queue) >= config.queue_limit:
        raise NoCapacity(f"instance {instance.name} has {len(instance.queue)} jobs queued (limit {config.queue_limit})")
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
    return run, PrefillAccepted(
        request_id=job.request_id,
        site=config.site,
        instance=instance.name,
        queue_position=ahead,
        expected_wait_s=wait_s,
        cached_blocks=cached,
    )
