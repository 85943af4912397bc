"""Leases follow the predicted time to the next KV: a slow layer is prefilled once; a failed transfer says what failed."""

from __future__ import annotations

import contextlib
import socket
import time

import msgspec
import pytest

from libs.cli.decisions import summarize
from libs.common.bus import connect, settle
from libs.common.messages import DecodeJob, PrefillJob
from libs.engine.profiles import hardware_profile, model_profile
from tests.router.deployment import PD, PRFAAS
from tests.router.test_end_to_end import api

LEASE_S = 0.5  # the router's least lease and the decode gateway's own: what a layer used to be allowed
PROMPT = [7] * 1024
TIME_SCALE = 64.0  # a simulated CPU prefill of PROMPT takes ~6 s: ~0.75 s per layer of the 8, over the lease
SLOW = {"backend": "simulated:cpu", "model": "reference", "time_scale": TIME_SCALE}
PREFILL_S = model_profile("reference").prefill_time_s(len(PROMPT), hardware_profile("cpu")) * TIME_SCALE
FAST = {"backend": "simulated:cpu", "model": "reference"}
DECODE = {"backend": "simulated:h20", "model": "reference", "lease_s": LEASE_S}


@contextlib.asynccontextmanager
async def watching(url: str, subject: str, decoder: msgspec.msgpack.Decoder):
    """Every message on ``subject`` while inside, decoded (a plain subscriber beside the gateways' own)."""
    seen: list = []
    nc = await connect(url, name="test-watch")

    async def keep(msg) -> None:
        seen.append(decoder.decode(msg.data))

    try:
        await nc.subscribe(subject, cb=keep)
        await settle(nc)
        yield seen
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
    await fleet.start_async(("prefill_gateway", site, prefill, {"cluster": f"sl-{site[3:]}"} | SLOW),
                            ("decode_gateway", PD, "sl-d0", DECODE))  # fmt: skip
    svc, decisions = await routed((prefill, "sl-d0"), lease_min_s=LEASE_S, lease_margin=2.0)
    async with watching(fleet.cluster.url(PD), "prfaas.v1.prefill.>", msgspec.msgpack.Decoder(PrefillJob)) as jobs:
        start = time.monotonic()
        out = await api(svc).completions.create(model="reference", prompt=PROMPT, max_tokens=2)
        ttft_s = time.monotonic() - start
    assert out.usage.completion_tokens == 2
    assert [(d.attempt, d.route) for d in decisions] == [(0, "remote" if site == PRFAAS else "local")]
    assert len(jobs) == 1
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
        await fleet.start_async(("prefill_gateway", PRFAAS, "fl-p0", {"cluster": "fl-prfaas"} | FAST),
                                ("prefill_gateway", PD, "fl-l0", {"cluster": "fl-pd"} | FAST),
                                ("decode_gateway", PD, "fl-d0", decode))  # fmt: skip
        svc, decisions = await routed(("fl-p0", "fl-l0", "fl-d0"), lease_min_s=LEASE_S, lease_margin=2.0)
        outcomes = _outcomes(svc)
        async with watching(fleet.cluster.url(PD), "prfaas.v1.decode.>", msgspec.msgpack.Decoder(DecodeJob)) as jobs:
            out = await api(svc).completions.create(model="reference", prompt=PROMPT, max_tokens=2)
        assert out.usage.completion_tokens == 2
        first, fallback = decisions
        assert first.route == "remote" and fallback.route == "fallback"
        reason = fallback.decision.reason
        assert reason.startswith("remote prefill on fl-p0 failed: transfer_failed: "), reason
        assert "lease expired: no KV progress for 0.50s" in reason and reason.endswith("; local prefill on dc-pd/fl-l0")
        # The retry's lease is the margin times the one that ran out: it cannot expire the same way.
        assert [j.lease_s for j in jobs] == [LEASE_S, pytest.approx(2 * LEASE_S)]
        await svc.events.close()
        summary = summarize(decisions + outcomes, PD)
        assert (summary["requests"], summary["offload_share"], summary["fell_back_to_local"]) == (1, 0.0, 1)
        assert summary["link_bytes"] == 0 and outcomes[0].prefill_site == PD
    finally:
        blackhole.close()
