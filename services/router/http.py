"""The router's HTTP API (aiohttp): OpenAI-compatible completions, models, explain, health and metrics."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from libs.common.errors import PrfaasError, Unauthorized
from libs.common.messages import json_encoder
from services.router import lifecycle, responses
from services.router.config import RouterConfig
from services.router.ids import new_id
from services.router.schemas import parse_chat, parse_completion, parse_explain

if TYPE_CHECKING:
    from services.router.service import RouterService

log = logging.getLogger(__name__)

SERVICE: web.AppKey[RouterService] = web.AppKey("router_service")
CONFIG = web.AppKey("router_config", RouterConfig)
_REQUEST_ID = web.RequestKey("prfaas_request_id", str)

_HTTP_ERRORS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _json(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json_encoder.encode(body), status=status, content_type="application/json", headers=headers)


def _error_response(
    error: PrfaasError, request: web.Request, retry_after_s: int, status: int | None = None
) -> web.Response:
    status = status or responses.status_of(error)
    headers = {lifecycle.REQUEST_ID_HEADER: request[_REQUEST_ID]} if _REQUEST_ID in request else {}
    if status in (503, 504):
        headers["Retry-After"] = str(retry_after_s)
    return _json(responses.error_body(error, status), status, headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Render every error in OpenAI's JSON shape with its status; count requests per endpoint."""
    config = request.app[CONFIG]
    svc = request.app[SERVICE]
    try:
        response = await handler(request)
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


def _check_key(request: web.Request, keys: tuple[str, ...]) -> None:
    """401 unless the bearer key is one of ``keys`` (compared in constant time against each)."""
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized("no API key given: send 'Authorization: Bearer <key>'")
    given = presented.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    if not matched:
        raise Unauthorized("incorrect API key")


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    """API keys (when configured) guard ``/v1/``; health and metrics stay open."""
    keys = request.app[CONFIG].api_keys
    if keys and request.path.startswith("/v1/"):
        _check_key(request, keys)
    return await handler(request)


async def _body(request: web.Request) -> bytes:
    """The request body within the read deadline (413 past the size limit, via aiohttp)."""
    config = request.app[CONFIG]
    try:
        async with asyncio.timeout(config.read_timeout_s):
            return await request.read()
    except TimeoutError:
        raise PrfaasError(
            f"request body not received within {config.read_timeout_s}s", code="request_timeout"
        ) from None


async def _generate(request: web.Request, parse) -> web.StreamResponse:
    request_id = request[_REQUEST_ID] = new_id()
    req = parse(await _body(request))
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
    req = parse_explain(await _body(request))
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
    """``GET /readyz``: 200 only when the bus, the KV index, a decode instance and a prefill instance answer."""
    checks = await request.app[SERVICE].readiness()
    ready = all(checks.values())
    return _json({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` in the Prometheus text format."""
    body = generate_latest(request.app[SERVICE].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(service: RouterService, config: RouterConfig) -> web.Application:
    """The aiohttp application of one router service."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[error_middleware, auth_middleware])
    app[SERVICE] = service
    app[CONFIG] = config
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
