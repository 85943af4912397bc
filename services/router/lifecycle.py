"""One generation request from HTTP to tokens: prepare, run with fallbacks, answer (whole or streamed), report.

The HTTP status is committed only when the first token exists, so a request that cannot be served
at all gets a real error status (503 with ``Retry-After`` when no capacity is left). After that, a
failure ends the stream with an error event and ``[DONE]``, never a silent close. A client that goes
away cancels the run, which cancels the jobs on the gateways. The outcome event is published once
the response is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from opentelemetry import trace

from libs.common.errors import PrfaasError
from libs.common.messages import json_encoder
from services.router import responses
from services.router.dispatch import RequestRun
from services.router.schemas import GenerationRequest, invalid
from services.router.sse import SseStream, event
from services.router.tokenization import IncrementalDecoder

if TYPE_CHECKING:
    from services.router.service import RouterService

log = logging.getLogger(__name__)
tracer = trace.get_tracer(__name__)

REQUEST_ID_HEADER = "x-prfaas-request-id"
TTFT_SLO_HEADER = "x-prfaas-ttft-slo-ms"
_CONTEXT_TOKENS = 6  # prompt tokens decoded before the first output token, for its context


def ttft_slo_s(request: web.Request) -> float | None:
    """The optional per-request TTFT target, in seconds (400 if the header is not a positive number)."""
    raw = request.headers.get(TTFT_SLO_HEADER)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise invalid(TTFT_SLO_HEADER, f"{TTFT_SLO_HEADER} must be a positive number of milliseconds, got {raw!r}")
    return value / 1000.0


async def serve(
    svc: RouterService, request: web.Request, req: GenerationRequest, request_id: str
) -> web.StreamResponse:
    """Answer one generation request."""
    with tracer.start_as_current_span("router.request", kind=trace.SpanKind.SERVER) as span:
        span.set_attribute("prfaas.request_id", request_id)
        span.set_attribute("prfaas.model", req.model)
        started = time.perf_counter()
        prepared = await svc.scheduler.prepare(req, request_id, ttft_slo_s(request))
        if prepared.index_status.startswith("unavailable"):
            svc.metrics.index_errors.inc()
        run = RequestRun(svc.dispatch, prepared)
        svc.metrics.in_flight.inc()
        status = "ok"
        try:
            async with contextlib.aclosing(run.tokens()) as tokens:
                first = await anext(tokens, None)
                svc.metrics.decision_seconds.observe(run.record.decide_done_at - started)
                if req.stream:
                    return await _stream(svc, request, req, run, tokens, first, request_id)
                return await _whole(svc, req, run, tokens, first, request_id)
        except PrfaasError as e:
            run.record.status, run.record.error = "error", f"{e.code}: {e.message}"
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = "cancelled"
            svc.metrics.cancelled.inc()
            raise
        finally:
            svc.metrics.in_flight.dec()
            status = status if status == "cancelled" else run.record.status
            span.set_attribute("prfaas.status", status)
            if run.record.decision is not None:
                span.set_attribute("prfaas.route", run.record.decision.route)
            svc.spawn(_report(svc, run, status, run.record.error))


async def _report(svc: RouterService, run: RequestRun, status: str, error: str) -> None:
    """After the response: wait briefly for the prefill status, then publish the outcome."""
    await run.settle()
    outcome = run.outcome(status, error)
    if outcome.ttft_s is not None:
        svc.metrics.ttft_seconds.labels(outcome.route).observe(outcome.ttft_s)
    svc.metrics.fallbacks.inc(max(0, run.record.attempts - 1))
    await svc.events.outcome(outcome)


def _usage(run: RequestRun) -> dict:
    rec = run.record
    fin, pre = rec.finished, rec.prefill
    completion = fin.completion_tokens if fin else rec.completion_tokens
    cached = max(pre.cached_tokens if pre else 0, fin.held_tokens if fin else 0)
    return responses.usage(len(run.prepared.prompt_ids), completion, cached)


def _finish_reason(run: RequestRun) -> str:
    fin = run.record.finished
    return fin.finish_reason if fin and fin.finish_reason in ("stop", "length") else "stop"


def _logprobs(svc: RouterService, req: GenerationRequest) -> responses.LogprobsRenderer | None:
    """A renderer of the request's log probabilities, if it asked for them."""
    if req.sampling.logprobs is None:
        return None
    return responses.LogprobsRenderer(req.kind, svc.scheduler.tokenizer.token_piece)


async def _whole(
    svc: RouterService, req: GenerationRequest, run: RequestRun, tokens, first, request_id: str
) -> web.Response:
    decoder = IncrementalDecoder(svc.scheduler.tokenizer, run.prepared.prompt_ids[-_CONTEXT_TOKENS:])
    parts = [decoder.push(first)] if first else []
    async for ids in tokens:
        parts.append(decoder.push(ids))
    parts.append(decoder.flush())
    renderer = _logprobs(svc, req)
    body = responses.completion(
        req.kind,
        responses.completion_id(req.kind, request_id),
        int(time.time()),
        req.model,
        "".join(parts),
        _finish_reason(run),
        _usage(run),
        renderer.render(run.record.logprobs) if renderer else None,
    )
    return web.Response(
        body=json_encoder.encode(body), content_type="application/json", headers={REQUEST_ID_HEADER: request_id}
    )


async def _stream(
    svc: RouterService, request: web.Request, req: GenerationRequest, run: RequestRun, tokens, first, request_id: str
) -> web.StreamResponse:
    kind, model = req.kind, req.model
    cid, created = responses.completion_id(kind, request_id), int(time.time())
    usage_nulls = req.include_usage

    def whole(body: dict) -> bytes:
        return event(json_encoder.encode(body))

    deltas = _Deltas(kind, cid, created, model, usage_nulls, run, _logprobs(svc, req))
    decoder = IncrementalDecoder(svc.scheduler.tokenizer, run.prepared.prompt_ids[-_CONTEXT_TOKENS:])
    text = decoder.push(first) if first else ""
    opening = whole(
        responses.chunk(
            kind,
            cid,
            created,
            model,
            text,
            first=True,
            with_usage=usage_nulls,
            logprobs=deltas.logprobs(len(first or ())),
        )
    )
    sse = await SseStream.open(request, {REQUEST_ID_HEADER: request_id}, opening, svc.config.write_timeout_s)
    held = b""  # the last text, sent with the end of the stream
    try:
        async for ids in tokens:
            delta = deltas.push(decoder.push(ids), len(ids))
            if delta and run.record.finished is not None:
                held += delta
            elif delta:
                await sse.send(delta)
    except PrfaasError as e:  # the decode side failed after tokens were sent: say so in the stream
        log.warning("stream ended by an error", extra={"request_id": request_id, "error": str(e)})
        run.record.status, run.record.error = "error", f"{e.code}: {e.message}"
        await sse.close(held + whole(responses.error_body(e, responses.status_of(e))))
        return sse.response
    last = held + deltas.push(decoder.flush(), 0, last=True)
    last += whole(responses.chunk(kind, cid, created, model, None, _finish_reason(run), with_usage=usage_nulls))
    if req.include_usage:
        last += whole(responses.usage_chunk(kind, cid, created, model, _usage(run)))
    await sse.close(last)
    return sse.response


class _Deltas:
    """The SSE events of a stream's text deltas, each with its tokens' log probabilities when they were asked for.

    Without log probabilities a delta's fixed parts are encoded once (``DeltaEncoder``); with them, the
    tokens of a step whose text is held back (an incomplete character) go with the next delta.
    """

    def __init__(
        self,
        kind: str,
        cid: str,
        created: int,
        model: str,
        with_usage: bool,
        run: RequestRun,
        renderer: responses.LogprobsRenderer | None,
    ) -> None:
        self._fields = (kind, cid, created, model)
        self._with_usage = with_usage
        self._encoder = responses.DeltaEncoder(kind, cid, created, model, with_usage=with_usage)
        self._run = run
        self._renderer = renderer
        self._taken = 0  # log probabilities rendered so far
        self._owed = 0  # tokens received whose log probabilities await a delta

    def logprobs(self, n_tokens: int) -> dict | None:
        """The log probabilities of the next ``n_tokens`` tokens (and any owed), rendered; None when not asked for."""
        if self._renderer is None:
            return None
        end = self._taken + self._owed + n_tokens
        entries, self._taken, self._owed = self._run.record.logprobs[self._taken : end], end, 0
        return self._renderer.render(entries)

    def push(self, text: str, n_tokens: int, *, last: bool = False) -> bytes:
        """The event for ``text`` from ``n_tokens`` new tokens (b"" while nothing can be sent yet)."""
        if self._renderer is None:
            return self._encoder.event(text) if text else b""
        if not text and not (last and self._owed):
            self._owed += n_tokens
            return b""
        body = responses.chunk(*self._fields, text, with_usage=self._with_usage, logprobs=self.logprobs(n_tokens))
        return event(json_encoder.encode(body))
