"""Leases follow the predicted time to the next KV: a slow layer is prefilled once; a failed transfer says what failed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from dataclasses import dataclass, field

import msgspec
import openai
import pytest

from libs.cli.decisions import summarize
from libs.common.bus import connect, settle
from libs.common.messages import DecodeJob, PrefillJob
from libs.engine.profiles import hardware_profile, model_profile
from services.prefill_gateway.layer_time import LayerTimes
from tests.router.deployment import PD, PRFAAS
from tests.router.test_end_to_end import api

LEASE_S = 0.5  # the router's least lease and the decode gateway's own: what a layer used to be allowed
PROMPT = [7] * 1024
TIME_SCALE = 64.0  # a simulated CPU prefill of PROMPT takes ~6 s: ~0.75 s per layer of the 8, over the lease
SLOW = {"backend": "simulated:cpu", "model": "reference", "time_scale": TIME_SCALE}
PREFILL_S = model_profile("reference").prefill_time_s(len(PROMPT), hardware_profile("cpu")) * TIME_SCALE
FAST = {"backend": "simulated:cpu", "model": "reference"}
DECODE = {"backend": "simulated:h20", "model": "reference", "lease_s": LEASE_S}
FROZEN = {"backend": "simulated:cpu", "model": "reference", "time_scale": 30.0}
FROZEN_LIMIT_S = 2.0 * LayerTimes(model_profile("reference"), hardware_profile("cpu"), 30.0).slowest_layer_s(
    len(PROMPT)
)


@dataclass
class Watch:
    """What a plain subscriber beside the gateways' own saw on a subject."""

    seen: list = field(default_factory=list)
    first: asyncio.Event = field(default_factory=asyncio.Event)  # set by the first message


@contextlib.asynccontextmanager
async def watching(url: str, subject: str, decoder: msgspec.msgpack.Decoder | None = None):
    """Every message on ``subject`` while inside (decoded if a decoder is given, else its subject)."""
    watch = Watch()
    nc = await connect(url, name="test-watch")

    async def keep(msg) -> None:
        watch.seen.append(decoder.decode(msg.data) if decoder else msg.subject)
        watch.first.set()

    try:
        await nc.subscribe(subject, cb=keep)
        await settle(nc)
        yield watch
    finally:
        await nc.drain()


def _outcomes(svc) -> list:
    """Outcome events the router publishes from now on."""
    got: list = []
    original = svc.events.outcome

    async def keep(event) -> None:
        got.append(event)
        await original(event)

    svc.events.outcome = keep
    return got


@pytest.mark.parametrize("site", [PRFAAS, PD])
async def test_a_layer_longer_than_the_lease_is_prefilled_once(fleet, routed, site):
    """Layers of ~0.75 s against a 0.5 s lease: one attempt, one PrefillJob, TTFT about one prefill (remote and local)."""
    prefill = f"sl-{site[3:]}-p0"
    await fleet.start_async(
        ("prefill_gateway", site, prefill, {"cluster": f"sl-{site[3:]}"} | SLOW),
        ("decode_gateway", PD, "sl-d0", DECODE),
    )
    svc, decisions = await routed((prefill, "sl-d0"), lease_min_s=LEASE_S, lease_margin=2.0)
    async with watching(fleet.cluster.url(PD), "prfaas.v1.prefill.>", msgspec.msgpack.Decoder(PrefillJob)) as jobs:
        start = time.monotonic()
        out = await api(svc).completions.create(model="reference", prompt=PROMPT, max_tokens=2)
        ttft_s = time.monotonic() - start
    assert out.usage.completion_tokens == 2
    assert [(d.attempt, d.route) for d in decisions] == [(0, "remote" if site == PRFAAS else "local")]
    assert len(jobs.seen) == 1
    # At least the modelled prefill; at most 1.5x of it: the simulated layers sleep to absolute deadlines,
    # so a loaded machine delays only the last wake-up, and ~3 s is left for the two legs and one decode step.
    assert PREFILL_S * 0.95 <= ttft_s <= PREFILL_S * 1.5


async def test_a_failed_remote_transfer_falls_back_saying_so_and_counts_as_local(fleet, routed):
    """KV that never arrives from the PrfaaS site: the fallback names the failure, gets a longer lease, counts as local."""
    blackhole = socket.socket()  # listens, never accepts: the remote sender's KV goes nowhere
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(16)
    try:
        decode = DECODE | {"advertise_by_site": f"{PRFAAS}=127.0.0.1:{blackhole.getsockname()[1]}"}
        await fleet.start_async(
            ("prefill_gateway", PRFAAS, "fl-p0", {"cluster": "fl-prfaas"} | FAST),
            ("prefill_gateway", PD, "fl-l0", {"cluster": "fl-pd"} | FAST),
            ("decode_gateway", PD, "fl-d0", decode),
        )
        svc, decisions = await routed(("fl-p0", "fl-l0", "fl-d0"), lease_min_s=LEASE_S, lease_margin=2.0)
        outcomes = _outcomes(svc)
        async with watching(fleet.cluster.url(PD), "prfaas.v1.decode.>", msgspec.msgpack.Decoder(DecodeJob)) as jobs:
            out = await api(svc).completions.create(model="reference", prompt=PROMPT, max_tokens=2)
        assert out.usage.completion_tokens == 2
        assert [j.lease_s for j in jobs.seen] == [
            LEASE_S,
            LEASE_S,
        ]  # a transfer that never began says nothing of layers
        first, fallback = decisions
        assert first.route == "remote" and fallback.route == "fallback"
        reason = fallback.decision.reason
        assert reason.startswith("remote prefill on fl-p0 failed: transfer_failed: "), reason
        assert "lease expired: no KV progress for 0.50s (the transfer had not begun)" in reason
        assert reason.endswith("; local prefill on dc-pd/fl-l0")
        await svc.events.close()
        summary = summarize(decisions + outcomes, PD)
        assert (summary["requests"], summary["offload_share"], summary["fell_back_to_local"]) == (1, 0.0, 1)
        assert summary["link_bytes"] == 0 and outcomes[0].prefill_site == PD
    finally:
        blackhole.close()


@pytest.mark.parametrize("margin", [2.0, 1.0])
async def test_a_lease_run_out_inside_the_transfer_is_retried_only_with_a_longer_one(fleet, routed, margin):
    """The PrfaaS prefill freezes after its first layer: retried locally with margin x the limit, or not at all at 1x.

    Its layers take ~0.35 s and it predicts ~0.45 s for the slowest, so the decode side waits ~0.9 s between
    parts; the frozen process heartbeats no more, but the router would notice that only after 2 s.
    """
    name = f"fz{margin:.0f}"
    await fleet.start_async(
        ("prefill_gateway", PRFAAS, f"{name}-p0", {"cluster": name} | FROZEN),
        ("prefill_gateway", PD, f"{name}-l0", {"cluster": f"{name}-pd"} | FAST),
        ("decode_gateway", PD, f"{name}-d0", DECODE),
    )
    frozen = fleet.procs[f"{name}-p0"]
    svc, decisions = await routed(tuple(fleet.procs), lease_min_s=LEASE_S, lease_margin=margin, transport="jetstream")
    try:
        async with watching(fleet.cluster.url(PD), "prfaas.v1.decode.>", msgspec.msgpack.Decoder(DecodeJob)) as jobs:
            async with watching(fleet.cluster.url(PD), "prfaas.v1.kvx.>") as chunks:
                request = asyncio.ensure_future(
                    api(svc).completions.create(model="reference", prompt=PROMPT, max_tokens=2)
                )
                async with asyncio.timeout(30):
                    await chunks.first.wait()  # the first layer's KV is on its way: the transfer has begun
                os.kill(frozen.pid, signal.SIGSTOP)
                if margin == 1.0:
                    with pytest.raises(openai.APIStatusError, match="inside the transfer"):
                        await request
                else:
                    assert (await request).usage.completion_tokens == 2
    finally:
        frozen.kill()
    if margin == 1.0:  # a retry with the same lease for the same prompt must fail the same way: none is made
        assert len(decisions) == 1 and len(jobs.seen) == 1
    else:
        assert (
            f"lease expired: no KV progress for {FROZEN_LIMIT_S:.2f}s inside the transfer"
            in decisions[1].decision.reason
        )
        assert [j.lease_s for j in jobs.seen] == [LEASE_S, pytest.approx(2 * FROZEN_LIMIT_S)]
