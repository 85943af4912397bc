"""One request's run across the gateways: decide, reserve decode, start prefill, stream tokens, fall back.

Each attempt publishes its decision, sends the ``DecodeJob`` (a reservation, or a typed refusal at
once), then the ``PrefillJob`` to the chosen instance, and reads the token stream and the prefill
status on one inbox. What fails before the first token is retried with a new decision:

- remote prefill refused, timed out, or its transfer failed -> local prefill (route ``fallback``);
- decode instance full, gone, or failed -> another decode instance;
- a local prefill instance refused or failed -> another prefill instance.

A fallback decision's reason starts with what failed. A transfer whose lease ran out inside it (a layer
of this prompt took longer than the decode side waits) is retried with at least the margin times that
limit, since the same prompt's layer takes as long elsewhere; when the hard deadline leaves no longer
lease, it is not retried at all. A transfer that never began is retried as any other failure.

A failed attempt's jobs are cancelled on ``jobs.cancel`` so the gateways free what they hold. After
the first token a failure cannot be hidden: it ends the stream with an error (``DecodeFailed``).
Token chunks lost on the way (the router's connection came back after a server restart) are asked
for again (``stream_repair.py``); a gap that cannot be repaired is such a failure, never a silent one.
Heartbeats are judged only once the router's connection has been up an instance TTL (what was sent
while it was down is lost, not late).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient
from opentelemetry import trace

from libs.common import subjects
from libs.common.errors import (
    BadRequest,
    NoCapacity,
    PrfaasError,
    TransferFailed,
    Unreachable,
    UpstreamTimeout,
    error_from_code,
)
from libs.common.messages import (
    DecisionEvent,
    DecodeFinished,
    DecodeJob,
    DecodeReservation,
    ErrorReply,
    JobCancel,
    OutcomeEvent,
    PrefillAccepted,
    PrefillFinished,
    PrefillJob,
    TokenChunk,
    TokenLogprob,
    encode,
)
from services.decode_gateway.client import DecodeGatewayClient
from services.prefill_gateway.client import PrefillGatewayClient
from services.router.config import RouterConfig
from services.router.events import DecisionLog
from services.router.ids import new_id
from services.router.live_view import LiveView, Placement
from services.router.mailbox import STATUS, Mailbox
from services.router.scheduler import Prepared, Scheduler
from services.router.stream_repair import StreamGap, StreamRepair

log = logging.getLogger(__name__)
_RETRY_BACKOFF_S = 0.1  # per attempt, before trying an instance that refused or failed once more
_NOT_BACK = "not listening yet after the router's connection came back"
_LIVENESS_CHECK_S = 0.25  # while waiting on a job: how often the instances' heartbeats are checked
tracer = trace.get_tracer(__name__)


class DecodeFailed(PrfaasError):
    """The decode side failed after tokens were already sent to the client."""

    code = "decode_failed"


@dataclass
class _Retry(Exception):
    """An attempt failed before its first token; the next decision avoids what failed."""

    reason: str
    error: PrfaasError
    exclude: frozenset[str] = frozenset()
    local_only: bool = False
    gone: bool = False  # the excluded instance did not answer at all (not merely busy or failing this job)
    expired_lease_s: float = 0.0  # the decode side's no-progress limit that ran out inside the transfer (0: none)


@dataclass(frozen=True)
class DispatchContext:
    """What every request's run shares: the router's settings, scheduler, live view, event log, inbox and clients."""

    nc: NatsClient
    config: RouterConfig
    scheduler: Scheduler
    view: LiveView
    events: DecisionLog
    mailbox: Mailbox
    decode: DecodeGatewayClient
    prefill: PrefillGatewayClient
    observe: Callable[[DecisionEvent], None]  # the slow timescale's intake of first decisions


@dataclass
class RunRecord:
    """What the run observed, for the outcome event."""

    attempts: int = 0
    decision: DecisionEvent | None = None
    prefill: PrefillFinished | None = None
    finished: DecodeFinished | None = None
    first_token_at: float | None = None  # monotonic
    last_token_at: float | None = None
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of every token streamed, when asked for
    status: str = "ok"
    error: str = ""
    decide_done_at: float = 0.0  # perf_counter when the first decision was made
    job_ids: list[str] = field(default_factory=list)


class RequestRun:
    """Runs one prepared request; ``tokens()`` yields token-id lists as the decode side releases them."""

    def __init__(self, ctx: DispatchContext, prepared: Prepared) -> None:
        self.ctx = ctx
        self.config = ctx.config
        self.view = ctx.view
        self.mailbox = ctx.mailbox
        self.prepared = prepared
        self.record = RunRecord()
        self.lease_floor_s = 0.0  # raised after a lease ran out, so no retry waits as briefly again
        self._open_queue: asyncio.Queue | None = None  # the finished attempt's, kept until the prefill status arrives

    async def tokens(self) -> AsyncIterator[list[int]]:
        """Token ids in order; raises the typed error when no attempt can serve the request."""
        gone: frozenset[str] = frozenset()  # instances that did not answer: never retried
        avoid: frozenset[str] = frozenset()  # instances that refused or failed a job: avoided while others exist
        local_only = False
        fallback_of = ""
        while True:
            attempt = self.record.attempts
            with tracer.start_as_current_span("router.decide") as span:
                event = await self._decide(attempt, gone, avoid, local_only, fallback_of)
                span.set_attribute("prfaas.route", event.route)
            self.record.attempts += 1
            self.record.decision = event
            if attempt == 0:
                self.record.decide_done_at = time.perf_counter()
                self.ctx.observe(event)
            await self.ctx.events.decision(event)
            try:
                async for ids in self._attempt(event):
                    yield ids
                return
            except _Retry as retry:
                log.info(
                    "attempt failed; deciding again",
                    extra={"request_id": self.prepared.request_id, "reason": retry.reason},
                )
                if self.record.attempts >= self.config.max_attempts or not self._lengthen_lease(retry):
                    raise retry.error from None
                if retry.gone:
                    gone |= retry.exclude
                else:
                    avoid |= retry.exclude
                local_only = local_only or retry.local_only
                fallback_of = retry.reason

    def _lengthen_lease(self, retry: _Retry) -> bool:
        """After a lease ran out, make the next one the margin longer; False when the deadline leaves none longer."""
        if not retry.expired_lease_s:
            return True
        floor_s = min(self.config.job_timeout_s, self.config.lease_margin * retry.expired_lease_s)
        self.lease_floor_s = max(self.lease_floor_s, floor_s)
        return floor_s > retry.expired_lease_s

    async def _decide(
        self, attempt: int, gone: frozenset[str], avoid: frozenset[str], local_only: bool, fallback_of: str
    ) -> DecisionEvent:
        """Decide avoiding what failed; if that leaves nothing, wait a moment and allow the busy ones again.

        With no decode or no prefill instance in the view at all, wait for one as long as for a reservation (for
        every attempt's while the router's bus is down): the view is empty while the router starts (heartbeats
        come every 0.5 s) and while its NATS server restarts (every instance expires meanwhile), and a 503 then
        would be no instance's doing.
        """
        cfg = self.config
        bus_down = not self.ctx.nc.is_connected
        await self.view.until_serving(cfg.reserve_timeout_s * (cfg.max_attempts if bus_down else 1))
        decide = self.ctx.scheduler.decide
        try:
            event = decide(
                self.prepared, attempt=attempt, exclude=gone | avoid, local_only=local_only, fallback_of=fallback_of
            )
        except NoCapacity:
            if not avoid:
                raise
            await asyncio.sleep(min(_RETRY_BACKOFF_S * attempt, 1.0))
            event = decide(self.prepared, attempt=attempt, exclude=gone, local_only=local_only, fallback_of=fallback_of)
        return _fallback_reason(event, local_only) if fallback_of else event

    async def _attempt(self, event: DecisionEvent) -> AsyncIterator[list[int]]:
        d = event.decision
        prepared = self.prepared
        job_id = prepared.request_id if event.attempt == 0 else f"{prepared.request_id}-a{event.attempt}"
        self.record.job_ids.append(job_id)
        queue = self.mailbox.open(job_id)
        placement = self.view.place(
            job_id, d.decode_instance, d.prefill_instance, d.predicted_prefill_s, remote=d.prefill_site != d.decode_site
        )
        done = False
        try:
            reservation = await self._reserve(event, placement)
            await self._start_prefill(event, placement, reservation)
            async for ids in self._stream(queue, event, placement):
                yield ids
            done = True
        finally:
            placement.close()
            if done and self.record.prefill is None:
                self._open_queue = queue
            else:
                self.mailbox.close(job_id)
            if not done:  # failed, retried, or the client went away: free what the gateways hold
                await self.cancel(job_id, "attempt abandoned")

    async def settle(self) -> None:
        """After the last token: wait up to ``settle_wait_s`` for the prefill status (it may trail the decode stream)."""
        queue, self._open_queue = self._open_queue, None
        if queue is None:
            return
        try:
            async with asyncio.timeout(self.config.settle_wait_s):
                while self.record.prefill is None:
                    _, item = await queue.get()
                    if isinstance(item, PrefillFinished):
                        self.record.prefill = item
        except TimeoutError:
            pass
        finally:
            self.mailbox.close(self.record.job_ids[-1])

    async def cancel(self, job_id: str, reason: str) -> None:
        """Tell every gateway to stop ``job_id`` and free what it holds."""
        try:
            await self.ctx.nc.publish(subjects.JOB_CANCEL, encode(JobCancel(request_id=job_id, reason=reason)))
        except nats.errors.Error as e:
            log.warning("cancel not published", extra={"request_id": job_id, "error": repr(e)})

    def lease_s(self, event: DecisionEvent) -> float:
        """How long the reservation waits for KV progress: the predicted wait for the first layer's KV, with a margin.

        The transfer opens when the prefill starts, so a job queued at its prefill instance makes no
        progress until then; a fixed lease would expire under a long queue. Once it opens, the decode
        side waits at least this long between parts, longer if the prefill instance predicts a longer
        layer (its manifest says). A prefill side that dies is noticed by its heartbeats' silence and
        its jobs cancelled, so a long lease does not strand slots.
        """
        d = event.decision
        rtt_s = d.signals.link_rtt_s if d.choice == "remote" else 0.0
        first_kv_s = d.predicted_queue_s + d.predicted_prefill_s / self.prepared.profile.n_layers + rtt_s
        cfg = self.config
        return min(cfg.job_timeout_s, max(cfg.lease_min_s, self.lease_floor_s, cfg.lease_margin * first_kv_s))

    async def _reconnecting(self, e: PrfaasError) -> bool:
        """True when ``e`` says nobody listens while the router's own connection came back under an instance TTL ago
        (the instance may be reconnecting still: not gone), once that TTL has passed, so the next decision sees only
        instances heard since (a gateway's subscriptions are back before its first heartbeat)."""
        if not isinstance(e, Unreachable):
            return False
        settling_s = self.config.instance_ttl_s - self.mailbox.up_for_s()
        if settling_s <= 0:
            return False
        await asyncio.sleep(settling_s)
        return True

    async def _reserve(self, event: DecisionEvent, placement: Placement) -> DecodeReservation:
        """The decode instance's reservation; a refusal or silence is a retry elsewhere (a bad request is final)."""
        d, p = event.decision, self.prepared
        job = DecodeJob(
            request_id=placement.job_id,
            transfer_id=new_id(),
            model=p.model,
            prompt_tokens=p.prompt_ids,
            max_tokens=p.max_tokens,
            reply_subject=self.mailbox.tokens_subject(placement.job_id),
            prefill_site=d.prefill_site,
            transport=d.transport,
            sampling=p.sampling,
            timeout_s=self.config.job_timeout_s,
            lease_s=self.lease_s(event),
        )
        with tracer.start_as_current_span("router.decode_job") as span:
            span.set_attribute("prfaas.instance", d.decode_instance)
            try:
                reservation = await self.ctx.decode.reserve(d.decode_site, d.decode_instance, job)
            except BadRequest:
                raise
            except PrfaasError as e:
                if await self._reconnecting(e):
                    raise _Retry(f"decode instance {d.decode_instance} {_NOT_BACK}: {e.message}", e) from None
                gone = isinstance(e, Unreachable)
                raise _Retry(
                    f"decode instance {d.decode_instance} {'unreachable' if gone else 'refused'}: {e.code}: "
                    f"{e.message}",
                    e,
                    exclude=frozenset({d.decode_instance}),
                    gone=gone,
                ) from None
        placement.acked("decode")
        return reservation

    async def _start_prefill(
        self, event: DecisionEvent, placement: Placement, reservation: DecodeReservation
    ) -> PrefillAccepted:
        """The prefill instance's acceptance; a refusal or silence is a retry (a failed remote one goes local)."""
        d, remote = event.decision, placement.remote
        where = placement.where
        load = self.view.load_of(d.prefill_instance)
        if load is None or not load.cluster:
            err = NoCapacity(f"{where}: the instance no longer heartbeats")
            raise _Retry(f"{where} gone", err, exclude=frozenset({d.prefill_instance}), local_only=remote, gone=True)
        job = PrefillJob(
            request_id=placement.job_id,
            transfer_id=reservation.transfer_id,
            model=self.prepared.model,
            prompt_tokens=self.prepared.prompt_ids,
            destination=reservation.destination,
            skip_blocks=reservation.held_blocks,
            status_subject=self.mailbox.status_subject(placement.job_id),
            timeout_s=self.config.job_timeout_s,
        )
        with tracer.start_as_current_span("router.prefill_job") as span:
            span.set_attribute("prfaas.instance", d.prefill_instance)
            span.set_attribute("prfaas.remote", remote)
            try:
                accepted = await self.ctx.prefill.submit(d.prefill_site, load.cluster, job, instance=d.prefill_instance)
            except BadRequest:
                raise
            except PrfaasError as e:
                if await self._reconnecting(e):
                    raise _Retry(f"{where} {_NOT_BACK}: {e.message}", e) from None
                gone = isinstance(e, Unreachable)
                if isinstance(e, UpstreamTimeout):  # unanswered: the job crosses the link to a remote site
                    placement.link_verdict(False, f"prefill job unanswered: {e.code}")
                raise _Retry(
                    f"{where} {'unreachable' if gone else 'refused'}: {e.code}: {e.message}",
                    e,
                    exclude=frozenset({d.prefill_instance}),
                    local_only=remote,
                    gone=gone,
                ) from None
        placement.acked("prefill")
        return accepted

    async def _stream(
        self, queue: asyncio.Queue, event: DecisionEvent, placement: Placement
    ) -> AsyncIterator[list[int]]:
        """Token ids until DecodeFinished; failures before the first token become retries.

        Each yield carries every token already received, so a client write carries all there is to send
        now; ``record.finished`` is set before the last yield when the stream's end arrived with it.
        """
        d = event.decision
        rec = self.record
        rec.prefill = rec.finished = None
        repair = StreamRepair(
            self.ctx.decode,
            self.mailbox,
            d.decode_site,
            d.decode_instance,
            placement.job_id,
            self.config.resend_after_s,
        )
        batch: list[int] = []
        while True:
            if batch and queue.empty() and not repair.replay:
                yield batch
                batch = []
            started = rec.first_token_at is not None
            kind, item = await self._next(queue, repair, d, started, placement)
            if isinstance(item, TokenChunk):
                if not repair.admit(item):
                    continue  # a duplicate, or past a gap (asked for again)
                now = time.monotonic()
                if rec.first_token_at is None and item.token_ids:
                    rec.first_token_at = now
                    placement.prefill_done()
                    placement.link_verdict(True)  # decode starts on a complete transfer: the KV crossed
                rec.last_token_at = now
                rec.completion_tokens += len(item.token_ids)
                rec.logprobs += item.logprobs
                batch += item.token_ids
            elif isinstance(item, DecodeFinished):
                if not self._complete(repair, item, started, d.decode_instance):
                    continue  # tokens are missing: asked for again, the final comes with them
                rec.finished = item
                if batch:
                    yield batch
                return
            elif isinstance(item, PrefillFinished):
                rec.prefill = item
                placement.prefill_done()
                placement.link_verdict(True)  # published once the transfer is verified
            else:
                if batch:  # what arrived before the failure reaches the client first
                    yield batch
                # a failed prefill leg (status) or decode leg (a transfer failure included)
                self._fail(
                    item, event, rec.first_token_at is not None, prefill_failed=kind == STATUS, placement=placement
                )

    def _complete(self, repair: StreamRepair, finished: DecodeFinished, started: bool, instance: str) -> bool:
        """Whether the stream holds every token ``finished`` counts (else they are asked for); an unrepairable gap
        fails the attempt."""
        try:
            return repair.complete(finished)
        except StreamGap as e:
            raise self._gap_failure(e, started, instance) from None

    @staticmethod
    def _gap_failure(gap: StreamGap, started: bool, instance: str) -> Exception:
        """After the first token a lost stretch ends the stream with an error; before it, another decode instance."""
        if started:
            return DecodeFailed(f"decode instance {instance}: {gap.message}")
        return _Retry(f"decode instance {instance} lost tokens", gap, exclude=frozenset({instance}))

    async def _next(self, queue: asyncio.Queue, repair: StreamRepair, d, started: bool, placement: Placement):
        """The job's next message (a resend's first); a silent stream or a leg whose instance stopped heartbeating
        is a failure."""
        timeout_s = self.config.token_timeout_s if started else self.config.first_token_wait_s
        end = time.monotonic() + timeout_s
        where, remote = placement.where, placement.remote
        while True:
            if repair.replay:
                return repair.replay.popleft()
            if repair.due(started):
                try:
                    await repair.ask()
                except StreamGap as e:
                    raise self._gap_failure(e, started, d.decode_instance) from None
                continue
            if not queue.empty():  # already here (most messages of a busy stream): no timer to arm
                repair.heard_at = time.monotonic()
                return queue.get_nowait()
            try:
                async with asyncio.timeout(min(_LIVENESS_CHECK_S, max(0.0, end - time.monotonic()))):
                    item = await queue.get()
                    repair.heard_at = time.monotonic()
                    return item
            except TimeoutError:
                pass
            # heartbeats sent while the router's connection was down are lost: judge them once new ones had time
            steady = self.mailbox.up_for_s() >= self.config.instance_ttl_s
            decode_alive = not steady or self.view.is_alive(d.decode_instance)
            if started and (not decode_alive or time.monotonic() >= end):
                why = "stopped heartbeating" if not decode_alive else f"went silent for {timeout_s}s"
                raise DecodeFailed(f"decode instance {d.decode_instance} {why} after the first token")
            if started:
                continue
            if not decode_alive:
                err = NoCapacity(f"decode instance {d.decode_instance} stopped heartbeating")
                raise _Retry(f"decode instance {d.decode_instance} silent", err, frozenset({d.decode_instance}))
            if steady and self.record.prefill is None and not self.view.is_alive(d.prefill_instance):
                err = NoCapacity(f"{where}: the instance stopped heartbeating")
                raise _Retry(f"{where} silent", err, frozenset({d.prefill_instance}), local_only=remote)
            if time.monotonic() >= end:
                err = UpstreamTimeout(f"no first token within {timeout_s}s ({where})")
                raise _Retry(f"{where} timed out", err, exclude=frozenset({d.prefill_instance}), local_only=remote)

    def _fail(
        self, reply: ErrorReply, event: DecisionEvent, started: bool, *, prefill_failed: bool, placement: Placement
    ) -> None:
        d = event.decision
        err = error_from_code(reply.code, reply.message)
        if started:
            raise DecodeFailed(
                f"decode instance {d.decode_instance} failed after the first token: {reply.code}: {reply.message}"
            )
        if isinstance(err, TransferFailed):
            placement.link_verdict(False, reply.code)
        if prefill_failed or isinstance(err, TransferFailed):
            raise _Retry(
                f"{placement.where} failed: {reply.code}: {reply.message}",
                err,
                exclude=frozenset({d.prefill_instance}),
                local_only=placement.remote,
                expired_lease_s=reply.lease_s,
            )
        where = f"decode instance {d.decode_instance}"
        raise _Retry(f"{where} failed: {reply.code}: {reply.message}", err, exclude=frozenset({d.decode_instance}))

    def outcome(self, status: str, error: str = "") -> OutcomeEvent:
        """The outcome event of this run."""
        rec = self.record
        p = self.prepared
        event = rec.decision
        d = event.decision if event else None
        fin, pre = rec.finished, rec.prefill
        ttft = rec.first_token_at - p.arrived if rec.first_token_at is not None else None
        tpot = None
        if rec.first_token_at is not None and rec.last_token_at is not None and rec.completion_tokens > 1:
            tpot = (rec.last_token_at - rec.first_token_at) / (rec.completion_tokens - 1)
        return OutcomeEvent(
            request_id=p.request_id,
            ts=time.time(),
            site=self.config.site,
            router=self.config.router_id,
            model=p.model,
            route=event.route if event else "",
            attempts=rec.attempts,
            status=status,
            error=error,
            finish_reason=fin.finish_reason if fin else "",
            prefill_site=d.prefill_site if d else "",
            prefill_instance=d.prefill_instance if d else "",
            decode_instance=d.decode_instance if d else "",
            prompt_tokens=len(p.prompt_ids),
            completion_tokens=fin.completion_tokens if fin else rec.completion_tokens,
            cached_tokens=max(pre.cached_tokens if pre else 0, fin.held_tokens if fin else 0),
            queue_s=pre.queue_s if pre else None,
            prefill_s=pre.prefill_s if pre else None,
            transfer_s=pre.transfer_exposed_s if pre else None,
            first_step_s=fin.timings.first_step_s if fin else None,
            ttft_s=ttft,
            tpot_s=tpot,
            bytes_moved=pre.sent_bytes if pre else (fin.received_bytes if fin else 0),
            predicted_ttft_s=d.predicted_ttft_s if d else None,
        )


def _fallback_reason(event: DecisionEvent, local_only: bool) -> DecisionEvent:
    """The event with a reason that starts with what failed, then what is done instead.

    After a remote failure the router leaves the PrfaaS sites out of the view, so the policy's own words
    for a view without them ("no PrfaaS site reachable") would misstate why the request stays local.
    """
    d = event.decision
    then = f"local prefill on {d.prefill_site}/{d.prefill_instance}" if local_only else d.reason
    return msgspec.structs.replace(event, decision=msgspec.structs.replace(d, reason=f"{d.fallback_of}; {then}"))
