"""The router's HTTP API (aiohttp): OpenAI-compatible completions, models, explain, health and metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from libs.common.errors import BadRequest, PrfaasError, Unauthorized
from libs.common.messages import json_encoder
from services.router import lifecycle, responses
from services.router.auth import RateLimited, RateLimiter, matching_digest
from services.router.config import RouterConfig
from services.router.ids import new_id
from services.router.schemas import parse_chat, parse_completion, parse_explain

if TYPE_CHECKING:
    from services.router.service import RouterService

log = logging.getLogger(__name__)

SERVICE: web.AppKey[RouterService] = web.AppKey("router_service")
CONFIG = web.AppKey("router_config", RouterConfig)
LIMITER = web.AppKey("router_rate_limiter", RateLimiter)
_REQUEST_ID = web.RequestKey("prfaas_request_id", str)

_HTTP_ERRORS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _json(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json_encoder.encode(body), status=status, content_type="application/json", headers=headers)


def _error_response(
    error: PrfaasError, request: web.Request, retry_after_s: int, status: int | None = None
) -> web.Response:
    status = status or responses.status_of(error)
    headers = {lifecycle.REQUEST_ID_HEADER: request[_REQUEST_ID]} if _REQUEST_ID in request else {}
    if status in (429, 503, 504):
        headers["Retry-After"] = str(retry_after_s)
    return _json(responses.error_body(error, status), status, headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Render every error in OpenAI's JSON shape with its status; count requests per endpoint."""
    config = request.app[CONFIG]
    svc = request.app[SERVICE]
    try:
        response = await handler(request)
    except RateLimited as e:
        response = _error_response(e, request, e.retry_after_s, 429)
    except PrfaasError as e:
        response = _error_response(e, request, config.retry_after_s)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_ERRORS.get(e.status, "http_error")
        if e.status == 413:
            message = f"request body is larger than {config.max_body_bytes} bytes"
        else:
            message = e.reason if e.status != 404 else f"no route for {request.method} {request.path}"
        response = _error_response(PrfaasError(message, code=code), request, config.retry_after_s, e.status)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error", extra={"path": request.path})
        response = _error_response(PrfaasError("internal error"), request, config.retry_after_s)
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "unmatched"
    svc.metrics.requests.labels(endpoint, str(response.status)).inc()
    return response


def _key_digest(request: web.Request, digests: tuple[bytes, ...]) -> bytes:
    """The digest of the request's bearer key, 401 unless it is one of ``digests``."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        request.app[SERVICE].metrics.refused.labels("missing_key").inc()
        raise Unauthorized("no API key given: send 'Authorization: Bearer <key>'")
    found = matching_digest(presented.strip(), digests)
    if found is None:
        request.app[SERVICE].metrics.refused.labels("wrong_key").inc()
        raise Unauthorized("incorrect API key")
    return found


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    """On ``/v1/``: the API key (when keys are configured), then its rate (per key, else per client address).

    Health and metrics stay open and unlimited.
    """
    if request.path.startswith("/v1/"):
        digests = request.app[CONFIG].api_key_digests
        client = _key_digest(request, digests) if digests else request.remote
        limiter = request.app.get(LIMITER)
        if limiter is not None:
            try:
                limiter.check(client, time.monotonic())
            except RateLimited:
                request.app[SERVICE].metrics.refused.labels("rate_limited").inc()
                raise
    return await handler(request)


async def _body(request: web.Request) -> bytes:
    """The request body within the read deadline (413 past the size limit: at once when declared, else via aiohttp)."""
    config = request.app[CONFIG]
    if (request.content_length or 0) > config.max_body_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=config.max_body_bytes, actual_size=request.content_length)
    try:
        async with asyncio.timeout(config.read_timeout_s):
            return await request.read()
    except TimeoutError:
        raise PrfaasError(
            f"request body not received within {config.read_timeout_s}s", code="request_timeout"
        ) from None
    except (HttpProcessingError, RequestPayloadError) as e:  # a malformed chunked or compressed body
        raise BadRequest(f"malformed request body: {e}") from None


async def _generate(request: web.Request, parse) -> web.StreamResponse:
    request_id = request[_REQUEST_ID] = new_id()
    req = parse(await _body(request), request.app[CONFIG].request_limits)
    return await lifecycle.serve(request.app[SERVICE], request, req, request_id)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    return await _generate(request, parse_chat)


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    return await _generate(request, parse_completion)


async def explain(request: web.Request) -> web.Response:
    """``POST /v1/route/explain``: the decision this request would get now, without running it."""
    request_id = request[_REQUEST_ID] = new_id()
    req = parse_explain(await _body(request), request.app[CONFIG].request_limits)
    svc = request.app[SERVICE]
    prepared = await svc.scheduler.prepare(req, request_id, lifecycle.ttft_slo_s(request))
    event = svc.scheduler.decide(prepared)
    return web.Response(
        body=json_encoder.encode(event),
        content_type="application/json",
        headers={lifecycle.REQUEST_ID_HEADER: request_id},
    )


async def list_models(request: web.Request) -> web.Response:
    """``GET /v1/models``."""
    svc = request.app[SERVICE]
    return _json(responses.models(svc.scheduler.served_models(), svc.started_at))


async def retrieve_model(request: web.Request) -> web.Response:
    """``GET /v1/models/{model}``: the model if served, else 404 ``model_not_found``."""
    svc = request.app[SERVICE]
    model = request.match_info["model"]
    svc.scheduler.check_model(model)
    return _json(responses.model(model, svc.started_at))


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process serves HTTP."""
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: 200 only when the bus, the KV index, a decode instance and a prefill instance answer.

    The body also says whether KV can cross sites (``kv_path``); a broken path alone is 200 ``degraded``
    (503 with ``ROUTER_READY_REQUIRES_KV_PATH``).
    """
    svc = request.app[SERVICE]
    checks = await svc.readiness()
    kv_path = svc.kv_path()
    ready = all(checks.values())
    status = "not ready" if not ready else "ready" if kv_path["up"] else "degraded"
    return _json({"status": status, "checks": checks, "kv_path": kv_path}, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` in the Prometheus text format."""
    body = generate_latest(request.app[SERVICE].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(service: RouterService, config: RouterConfig) -> web.Application:
    """The aiohttp application of one router service, with the configured limits on what a client may send.

    A request line, header line or header count past its limit is answered 400 by aiohttp's parser and the
    connection closed; a connection without a whole request head for ``idle_timeout_s`` is closed.
    """
    limits = {
        "max_line_size": config.max_line_bytes,
        "max_field_size": config.max_header_bytes,
        "max_headers": config.max_headers,
        "keepalive_timeout": config.idle_timeout_s,
        "lingering_time": config.read_timeout_s,  # how long the unread rest of a refused body is drained
    }
    app = web.Application(
        client_max_size=config.max_body_bytes, handler_args=limits, middlewares=[error_middleware, auth_middleware]
    )
    app[SERVICE] = service
    app[CONFIG] = config
    if config.rate_limit_rps > 0:
        app[LIMITER] = RateLimiter(config.rate_limit_rps, config.rate_limit_burst, config.rate_limit_clients)
    app.add_routes(
        [
            web.post("/v1/chat/completions", chat_completions),
            web.post("/v1/completions", completions),
            web.post("/v1/route/explain", explain),
            web.get("/v1/models", list_models),
            web.get("/v1/models/{model}", retrieve_model),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
        ]
    )
    return app
