"""One prefill job: queue, compute layer by layer, stream each layer's parts to the reserved decode slot."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
import numpy as np
from nats.aio.client import Client as NatsClient
from opentelemetry import trace
from opentelemetry.context import Context

from libs.common.errors import NoCapacity, PrfaasError, UpstreamTimeout
from libs.common.jobs import SHUTDOWN
from libs.common.messages import ErrorReply, KvManifest, PrefillFinished, PrefillJob, encode
from libs.common.state_parts import PartSpec, StatePart
from libs.common.telemetry import inject_headers
from libs.kvwire import Destination, KvSender, SendReport
from services.prefill_gateway.config import PrefillGatewayConfig
from services.prefill_gateway.instance import PrefillInstance, QueuedJob
from services.prefill_gateway.layer_time import LayerClock
from services.prefill_gateway.metrics import PrefillGatewayMetrics
from services.prefill_gateway.senders import Senders

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

CANCELLED = "cancelled"  # error code of a job ended by a JobCancel
_END = object()


@dataclass(eq=False)
class PrefillRun:
    """An accepted job until its transfer is verified or it fails."""

    job: PrefillJob
    instance: PrefillInstance
    tokens: np.ndarray
    hashes: list[int]
    queued: QueuedJob
    deadline: float  # monotonic
    trace_context: Context
    received_at: float = field(default_factory=time.monotonic)
    cancel_reason: str = ""
    opened: bool = False  # the transfer may exist at the receiver (abort it on failure)
    sender: KvSender | None = None

    @property
    def destination(self) -> Destination:
        """Where the KV goes."""
        d = self.job.destination
        return Destination(d.site, d.instance, d.host, d.port)


@dataclass(frozen=True)
class JobContext:
    """What a prefill job touches: the bus, the gateway's settings, its KV senders, its metrics."""

    nc: NatsClient
    config: PrefillGatewayConfig
    senders: Senders
    metrics: PrefillGatewayMetrics


def part_specs(svc: JobContext, run: PrefillRun) -> list[PartSpec]:
    """The parts to send, with the job's codec on float ``attn_kv`` parts (the rest travels raw)."""
    codec = run.job.codec or svc.config.codec
    specs = run.instance.backend.plan_parts(len(run.tokens), run.job.skip_blocks)
    return [
        msgspec.structs.replace(s, codec=codec) if s.kind == "attn_kv" and np.dtype(s.dtype).kind == "f" else s
        for s in specs
    ]


async def run_prefill(svc: JobContext, run: PrefillRun) -> None:
    """Serve one accepted job to its end; publish ``PrefillFinished`` or an ``ErrorReply`` on its status subject."""
    job = run.job
    final: msgspec.Struct
    with tracer.start_as_current_span("prefill_gateway.job", context=run.trace_context) as span:
        span.set_attribute("prfaas.request_id", job.request_id)
        span.set_attribute("prfaas.instance", run.instance.name)
        try:
            async with asyncio.timeout_at(run.deadline):
                async with run.instance.kv_held:
                    final = await _prefill_and_send(svc, run)
        except asyncio.CancelledError:
            if not run.cancel_reason:
                raise
            code = NoCapacity.code if run.cancel_reason == SHUTDOWN else CANCELLED
            final = ErrorReply(code=code, message=run.cancel_reason)
        except TimeoutError:
            final = ErrorReply(
                code=UpstreamTimeout.code,
                message=f"prefill of {job.request_id} not delivered within its {job.timeout_s:.1f}s deadline",
            )
        except PrfaasError as e:
            final = ErrorReply(code=e.code, message=e.message)
        finally:
            dequeue(svc, run)
        failed = isinstance(final, ErrorReply)
        svc.metrics.jobs.labels(final.code if failed else "ok").inc()
        if failed:
            svc.metrics.failures.labels(final.code).inc()
            span.set_status(trace.Status(trace.StatusCode.ERROR, final.message))
            log.info(
                "prefill job failed", extra={"request_id": job.request_id, "code": final.code, "error": final.message}
            )
        if job.status_subject:
            try:
                await svc.nc.publish(job.status_subject, encode(final), headers=inject_headers())
            except (nats.errors.Error, OSError) as e:
                log.warning("status not published", extra={"request_id": job.request_id, "error": repr(e)})
        if failed and run.opened:  # after the status: the caller need not wait for an unreachable receiver
            await _abort(svc, run, final.message)
        await run.instance.events.flush()


def dequeue(svc: JobContext, run: PrefillRun) -> None:
    """Take the job off its instance's queue (its compute is over, or it ended before), once."""
    with contextlib.suppress(ValueError):
        run.instance.queue.remove(run.queued)
    svc.metrics.queue_depth.labels(run.instance.name).set(len(run.instance.queue))


async def _abort(svc: JobContext, run: PrefillRun, reason: str) -> None:
    """Tell the receiver to drop the transfer and free its memory (best effort, bounded)."""
    sender = run.sender or svc.senders.of(run.job.destination.transport)
    with contextlib.suppress(PrfaasError, TimeoutError, OSError, nats.errors.Error):
        async with asyncio.timeout(svc.config.abort_timeout_s):
            await sender.abort(run.job.transfer_id, run.destination, reason)


async def _prefill_and_send(svc: JobContext, run: PrefillRun) -> PrefillFinished:
    """Compute and transfer at once: each layer's parts go out as soon as the layer is done.

    The instance computes one prefill at a time and is free for the next once this one's compute
    ends; what is left of the transfer drains meanwhile.
    """
    await run.instance.compute.acquire()
    computed = _once(lambda: (run.instance.compute.release(), dequeue(svc, run)))
    try:
        return await _compute_and_send(svc, run, computed)
    finally:
        computed()


def _once(action: Callable[[], object]) -> Callable[[], None]:
    """``action`` the first time the result is called; nothing after."""
    done = False

    def call() -> None:
        nonlocal done
        if not done:
            done = True
            action()

    return call


async def _compute_and_send(svc: JobContext, run: PrefillRun, computed_hook: Callable[[], None]) -> PrefillFinished:
    job, instance = run.job, run.instance
    backend, bs = instance.backend, instance.backend.block_size
    started = time.monotonic()
    cached = min(backend.cache.usable_blocks(run.hashes), (len(run.tokens) - 1) // bs)
    clock = LayerClock(instance.times, len(run.tokens) - cached * bs, cached * bs)
    specs = part_specs(svc, run)
    sender = run.sender = svc.senders.pick(job.destination.transport, sum(s.nbytes for s in specs))
    manifest = sender.manifest(
        transfer_id=job.transfer_id,
        dst_site=job.destination.site,
        model=backend.model_name,
        block_size=bs,
        num_tokens=len(run.tokens),
        specs=specs,
        skipped_block_hashes=run.hashes[: job.skip_blocks],
        request_id=job.request_id,
    )
    # Sent as compute starts: the decode side waits this long (times its margin) for the next part.
    gap_s = clock.slowest_layer_s() if svc.config.layerwise else clock.prefill_s()
    manifest = msgspec.structs.replace(manifest, kv_gap_s=gap_s)
    queue: asyncio.Queue = asyncio.Queue()
    computed: list[float] = []

    async def compute() -> None:
        try:
            held: list[StatePart] = []  # without layer-wise streaming: every part, sent once the prefill is done
            hand_over = queue.put_nowait if svc.config.layerwise else held.append
            async for layer in backend.prefill(job.request_id, run.tokens, skip_blocks=job.skip_blocks):
                clock.lap(layer[0].layer)
                for part in layer:
                    hand_over(part)
            computed.append(time.monotonic())
            for part in held:
                queue.put_nowait(part)
            queue.put_nowait(_END)
        except Exception as e:  # the sender's part iterator raises it
            queue.put_nowait(e)
        finally:
            clock.stop()
            computed_hook()

    async def parts() -> AsyncIterator[StatePart]:
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item

    compute_task = asyncio.create_task(compute(), name=f"prefill-{job.request_id}")
    run.opened = True
    try:
        report = await _send_traced(svc, run, sender, manifest, parts())
    finally:
        compute_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await compute_task
    done = time.monotonic()
    compute_end = computed[0] if computed else done
    run.opened = False
    m = svc.metrics
    m.queue_seconds.observe(started - run.received_at)
    m.prefill_seconds.observe(compute_end - started)
    _observe_transfer(svc, job, report)
    m.exposed_seconds.observe(done - compute_end)
    m.cached_tokens.inc(cached * bs)
    return PrefillFinished(
        request_id=job.request_id,
        transfer_id=job.transfer_id,
        site=svc.config.site,
        instance=instance.name,
        queue_s=started - run.received_at,
        prefill_s=compute_end - started,
        transfer_s=report.duration_s,
        transfer_exposed_s=done - compute_end,
        cached_tokens=cached * bs,
        payload_bytes=report.payload_bytes,
        sent_bytes=report.sent_bytes,
        goodput_gbps=report.goodput_gbps,
    )


def _observe_transfer(svc: JobContext, job: PrefillJob, report: SendReport) -> None:
    """The transfer's time, goodput and bytes on the site pair's metrics."""
    pair = (svc.config.site, job.destination.site)
    svc.metrics.transfer_seconds.labels(*pair).observe(report.duration_s)
    svc.metrics.goodput_gbps.labels(*pair).observe(report.goodput_gbps)
    svc.metrics.sent_bytes.labels(*pair).inc(report.sent_bytes)


async def _send_traced(
    svc: JobContext, run: PrefillRun, sender: KvSender, manifest: KvManifest, parts: AsyncIterator[StatePart]
) -> SendReport:
    """The transfer as a span of the job's trace (a child of its job span), with what it carried and how."""
    job = run.job
    with tracer.start_as_current_span("prefill_gateway.transfer") as span:
        span.set_attributes(
            {
                "prfaas.request_id": job.request_id,
                "prfaas.transfer_id": job.transfer_id,
                "prfaas.kv.transport": job.destination.transport,
                "prfaas.kv.dst_site": job.destination.site,
                "prfaas.kv.budget_gbps": sender.links.link(job.destination.site).budget_gbps,
                "prfaas.kv.skipped_bytes": _held_prefix_bytes(run),
            }
        )
        report = await sender.send(manifest, parts, run.destination)
        span.set_attributes(
            {
                "prfaas.kv.sent_bytes": report.sent_bytes,
                "prfaas.kv.stripes": report.stripes,
                "prfaas.kv.goodput_gbps": report.goodput_gbps,
                "prfaas.kv.pacing_wait_s": report.pacing_wait_s,
                "prfaas.kv.resumes": report.resumes,
            }
        )
        if report.retransmits is not None:  # the kernel told (direct TCP on Linux)
            span.set_attribute("prfaas.kv.retransmits", report.retransmits)
        return report


def _held_prefix_bytes(run: PrefillRun) -> int:
    """Bytes of the K/V the decode side holds (its ``skip_blocks``), left out of the transfer (as planned, uncoded)."""
    if not run.job.skip_blocks:
        return 0
    plan, n = run.instance.backend.plan_parts, len(run.tokens)
    return sum(s.nbytes for s in plan(n)) - sum(s.nbytes for s in plan(n, run.job.skip_blocks))
