"""A stream in flight across a restart of the router's nats-server completes with every token, soon after.

Real processes: a nats-server (stopped and started again mid-stream), a prefill and a decode gateway
(simulated backends, so decode takes seconds); the router runs in this process. Core NATS drops the
chunks the decode side publishes while the router's subscription is coming back; the router asks
for them again once its connection is back, instead of passing a gap or waiting out its token timeout.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from libs.bench.gateways import GatewayProcess, gateway_env
from libs.common.bus import connect
from libs.common.messages import DecodeFinished
from libs.engine.simulated import _TEXT
from services.decode_gateway.client import DecodeGatewayClient
from services.router.lifecycle import REQUEST_ID_HEADER
from services.router.service import RouterService
from tests.router.conftest import HTTP_TIMEOUT, router_config, router_starter, sse_events, until
from tests.router.deployment import PD

TOKENS = 150
STEP_SCALE = 4.0  # the simulated decode step x4: ~20 ms a token, so the stream runs ~3 s, across the restart
INSTANCE_TTL_S = 1.0
TOKEN_TIMEOUT_S = 30.0  # the router's default: what a lost tail used to cost


async def _gateways(url: str, tmp_path) -> list[GatewayProcess]:
    """A prefill and a decode gateway at ``url``, once both heartbeat."""
    sim = {"site": PD, "heartbeat_s": 0.1, "backend": "simulated:h20", "model": "reference"}
    specs = [
        ("prefill_gateway", "rs-l0", sim | {"cluster": "pd", "instances": "rs-l0"}),
        ("decode_gateway", "rs-d0", sim | {"instance": "rs-d0", "time_scale": STEP_SCALE}),
    ]
    procs = []
    nc = await connect(url, name="test-wait")
    try:
        for kind, instance, settings in specs:
            proc = GatewayProcess(kind, gateway_env(kind, url, **settings), tmp_path / f"{instance}.log").spawn()
            procs.append(proc)
            await proc.ready(nc, PD, instance)
    except BaseException:
        for proc in procs:
            proc.stop(timeout_s=10)
        raise
    finally:
        await nc.close()
    return procs


@pytest.mark.parametrize("outage", ["restart", "past_ttl"])
async def test_a_stream_across_a_nats_server_restart_completes_whole(nats_server, tmp_path, outage):
    """The nats-server restarted after the first token (at once, or once the router's view lost the decode
    instance's heartbeats): every token arrives in order, no error, within seconds."""
    procs = await _gateways(nats_server.url, tmp_path)
    try:
        async with router_starter(nats_server.url) as start:
            svc = await start(instance_ttl_s=INSTANCE_TTL_S, token_timeout_s=TOKEN_TIMEOUT_S)
            await until(lambda: {"rs-l0", "rs-d0"} <= {ld.instance for ld in svc.view.alive()}, what="heartbeats")
            body = {"model": "reference", "prompt": [7] * 128, "max_tokens": TOKENS, "stream": True}
            text, errors, restarted_at = "", [], None
            async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
                async with http.post(svc.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200
                    request_id = resp.headers[REQUEST_ID_HEADER]
                    async for event in sse_events(resp):
                        if "error" in event:
                            errors.append(event["error"])
                            continue
                        text += event["choices"][0]["text"] or ""
                        if text and restarted_at is None:
                            await asyncio.to_thread(nats_server.stop)
                            if outage == "past_ttl":  # heartbeats missed: judged only once new ones could come
                                await until(lambda: not svc.view.is_alive("rs-d0"), what="decode instance expired")
                            await asyncio.to_thread(nats_server.start)
                            restarted_at = time.monotonic()
            ended_s = time.monotonic() - restarted_at
            assert errors == []
            # what the router would have been sent again: every chunk it was sent, then the final message
            resent = await DecodeGatewayClient(svc.nc).resend(PD, "rs-d0", request_id, 0)
    finally:
        for proc in procs:
            proc.stop(timeout_s=10)
    assert len(text) == TOKENS and text in _TEXT.decode() * (TOKENS // len(_TEXT) + 2)  # no chunk lost or repeated
    # the decode's remaining ~4 s and a reconnect; far under the token timeout a lost tail used to wait out
    assert ended_s < TOKEN_TIMEOUT_S / 2
    assert bytes(t for c in resent.chunks for t in c.token_ids).decode() == text
    assert isinstance(resent.final, DecodeFinished) and resent.final.completion_tokens == TOKENS


async def test_a_request_as_the_router_reconnects_first_waits_for_the_gateways(nats_server, tmp_path):
    """The router back before the gateways (their heartbeats from before the restart still fresh): a job nobody
    answers yet is tried again once an instance TTL passed, and the request is served, not refused with a 503."""
    procs = await _gateways(nats_server.url, tmp_path)
    client = await connect(nats_server.url, name="router", reconnect_wait_s=0.05)  # back ~10x sooner than gateways
    svc = RouterService(client, router_config(nats_server.url, instance_ttl_s=3.0))
    await svc.start()
    try:
        await until(lambda: {"rs-l0", "rs-d0"} <= {ld.instance for ld in svc.view.alive()}, what="heartbeats")
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(nats_server.start)
        await until(lambda: client.is_connected and client.stats["reconnects"] == 1, what="the router reconnected")
        body = {"model": "reference", "prompt": [7] * 128, "max_tokens": 4}
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            async with http.post(svc.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["usage"]["completion_tokens"] == 4
    finally:
        await svc.stop()
        await client.close()
        for proc in procs:
            proc.stop(timeout_s=10)
