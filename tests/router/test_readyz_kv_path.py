"""The cross-site KV path: down when no LinkStats are heard, the breaker is open or transfers keep failing; gauge and readiness."""

from __future__ import annotations

import dataclasses
import time

import aiohttp

from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.messages import LinkStats, encode
from libs.policy.breaker import BreakerConfig
from services.router.live_view import LiveView
from services.router.service import RouterService
from tests.router.conftest import HTTP_TIMEOUT, PD, PRFAAS, heartbeat, load, router_config, until

FAST = BreakerConfig(failures=2, window_s=10.0, silence_s=5.0, hold_s=0.05, max_hold_s=0.05, recover_s=0.0)
SILENCE_S = 0.3  # no LinkStats this long: the path is down (the router's default is 5 s)


def _stats(src: str = PRFAAS, dst: str = PD) -> LinkStats:
    return LinkStats(src, dst, time.time(), 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 0)


def _view() -> LiveView:
    return LiveView(
        PD,
        instance_ttl_s=60.0,
        pending_ttl_s=60.0,
        default_hardware="h20",
        link_capacities={(PRFAAS, PD): 10.0, (PD, PRFAAS): 10.0},
        breaker=FAST,
        linkstats_silence_s=SILENCE_S,
    )


def _attempt(view: LiveView, job: str, ok: bool) -> None:
    placement = view.place(job, "d0", "p-remote", prefill_s=0.1, remote=True)
    placement.link_verdict(ok, "transfer_failed: lease ran out")
    placement.close()


def _why(view: LiveView) -> str:
    [path] = view.kv_paths()
    assert (path.src_site, path.dst_site) == (PRFAAS, PD)
    return path.down_why


def test_a_configured_pair_never_heard_is_down_after_the_silence():
    """A pair with a capacity into the site but no LinkStats: up for the first silence, then down saying so."""
    view = _view()
    assert _why(view) == ""
    time.sleep(SILENCE_S * 1.5)
    assert _why(view).startswith(f"no LinkStats heard from {PRFAAS} for ")
    view.ingest_link(_stats(), "sender-1")
    assert _why(view) == ""


def test_failed_transfers_keep_the_path_down_until_one_crosses():
    """Two link failures open the breaker; once it is half-open with no probe, the path stays down until KV crosses."""
    view = _view()
    view.ingest_load(load("p-remote", role="prefill", site=PRFAAS))
    view.ingest_link(_stats(), "sender-1")
    _attempt(view, "j1", False)
    assert _why(view) == ""  # one failure says little
    _attempt(view, "j2", False)
    assert _why(view).startswith("breaker open: 2 transfers failed")
    time.sleep(FAST.hold_s * 3)
    view.ingest_link(_stats(), "sender-1")
    assert view.link_states()[0].state == "half-open"
    assert _why(view).startswith("2 transfers failed and none crossed since")
    _attempt(view, "j3", True)
    assert _why(view) == ""


async def _metric(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url + "/metrics") as r:
        text = await r.text()
    return next(line for line in text.splitlines() if line.startswith("prfaas_router_kv_path_up{"))


async def _readyz(http: aiohttp.ClientSession, url: str) -> tuple[int, str, dict]:
    async with http.get(url + "/readyz") as r:
        body = await r.json()
        return r.status, body["status"], body["checks"]


async def test_gauge_and_strict_readiness_follow_the_kv_path(nats_url, nc, kv_index):
    """No LinkStats: kv_path_up 0, a strict router not ready, a default one "degraded"; LinkStats: 1 and ready."""
    config = router_config(nats_url, link_capacities={(PRFAAS, PD): 10.0})
    clients = [await connect(nats_url, name=f"router-{i}") for i in range(2)]
    strict = RouterService(clients[0], dataclasses.replace(config, ready_requires_kv_path=True))
    lenient = RouterService(clients[1], config)
    for svc in (strict, lenient):
        svc.view.linkstats_silence_s = SILENCE_S
        await svc.start()
    try:
        loads = (load("d0"), load("p-remote", role="prefill", site=PRFAAS))
        async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
            await until(lambda: not strict.kv_path()["up"], what="kv path down without LinkStats")
            await heartbeat(nc, *loads)
            await until(lambda: len(strict.view.alive()) == len(lenient.view.alive()) == 2, what="heartbeats")
            status, word, checks = await _readyz(http, strict.url)
            assert status == 503 and word == "not ready" and checks["kv_path"] is False and checks["decode_instances"]
            status, word, checks = await _readyz(http, lenient.url)
            assert status == 200 and word == "degraded" and "kv_path" not in checks
            assert (
                await _metric(http, lenient.url)
                == f'prfaas_router_kv_path_up{{dst_site="{PD}",src_site="{PRFAAS}"}} 0.0'
            )
            assert strict.kv_path()["pairs"][f"{PRFAAS}->{PD}"].startswith("no LinkStats heard")
            await nc.publish(subjects.link(PRFAAS, PD), encode(_stats()))
            await heartbeat(nc, *loads)
            await settle(nc)
            await until(lambda: strict.kv_path()["up"], what="kv path up after LinkStats")
            status, word, checks = await _readyz(http, strict.url)
            assert status == 200 and word == "ready" and checks["kv_path"] is True
            assert (await _readyz(http, lenient.url))[:2] == (200, "ready")
            assert (await _metric(http, strict.url)).endswith(" 1.0")
    finally:
        for svc, client in zip((strict, lenient), clients, strict=True):
            await svc.stop()
            await client.drain()
