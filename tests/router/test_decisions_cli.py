"""`prfaas decisions tail|summary` over events the router publishes to the PRFAAS_DECISIONS stream."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import msgspec
import pytest

from libs.cli import main
from libs.cli.decisions import parse_duration_s
from libs.common import subjects
from libs.common.bus import settle
from libs.common.errors import BadRequest
from libs.common.messages import DecisionEvent, OutcomeEvent, RouteDecision, RouteSignals
from services.router.events import DecisionLog


def _signals(prompt_tokens: int, incremental_tokens: int) -> RouteSignals:
    return RouteSignals(
        prompt_tokens=prompt_tokens,
        incremental_tokens=incremental_tokens,
        cached_local_tokens=0,
        cached_remote_tokens=0,
        threshold_tokens=50,
        effective_threshold_tokens=50,
        kv_bytes=0,
        link_capacity_gbps=10.0,
        link_effective_gbps=10.0,
        link_utilization=0.0,
        link_rtt_s=0.02,
        prfaas_wait_s=0.0,
        local_wait_s=0.0,
        decode_free_slots=1,
        bandwidth="plentiful",
    )


def _decision(rid: str, route: str, cached: int = 0, attempt: int = 0, index: str = "ok") -> DecisionEvent:
    d = RouteDecision(
        request_id=rid,
        policy="adaptive",
        ts=time.time(),
        choice="local" if route == "local" else "remote",
        prefill_site="dc-pd" if route == "local" else "dc-prfaas",
        prefill_instance="p0",
        decode_site="dc-pd",
        decode_instance="d0",
        transport="tcp",
        reason="test",
        predicted_queue_s=0,
        predicted_prefill_s=0.1,
        predicted_transfer_s=0.0,
        predicted_ttft_s=0.2,
        transfer_bytes=0,
        signals=_signals(100, 100 - cached),
    )
    return DecisionEvent(
        request_id=rid,
        ts=time.time(),
        site="dc-pd",
        router="r",
        model="m",
        cached_tokens={"dc-pd": cached} if cached else {},
        route=route,
        attempt=attempt,
        index=index,
        decision=d,
    )


def _outcome(rid: str, route: str, ttft_s: float, bytes_moved: int) -> OutcomeEvent:
    return OutcomeEvent(
        request_id=rid,
        ts=time.time(),
        site="dc-pd",
        router="r",
        model="m",
        route=route,
        attempts=1,
        status="ok",
        prefill_site="dc-prfaas" if route != "local" else "dc-pd",
        ttft_s=ttft_s,
        bytes_moved=bytes_moved,
        predicted_ttft_s=0.2,
        completion_tokens=3,
    )


async def test_summary_replays_the_stream(nc, nats_url):
    """Offload share, cache-hit share, TTFT by route, link bytes, prediction error and index misses from the stream."""
    log = DecisionLog(nc, "dc-pd", max_age_s=3600, max_bytes=1 << 20)
    await log.ensure_stream()
    await log.decision(_decision("a", "remote", index="unavailable: upstream_timeout: no answer"))
    await log.decision(_decision("b", "local", cached=64))
    await log.decision(_decision("c", "local", index="not asked: a full cache hit would save under 5.0 ms"))
    await log.decision(_decision("a", "fallback", attempt=1))
    await log.outcome(_outcome("a", "fallback", 0.5, 0))
    await log.outcome(_outcome("b", "local", 0.1, 0))
    await log.outcome(_outcome("c", "remote", 0.3, 1000))
    await log.close()  # the outcomes still waiting for a decision to travel with
    older = msgspec.json.encode(msgspec.to_builtins(_decision("z", "remote")) | {"type": "route.decision_event.v1"})
    await nc.jetstream().publish(subjects.decisions("dc-pd"), older)  # an event a previous release published
    await settle(nc)
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "libs.cli", "decisions", "summary", "--nats", nats_url, "--json", "--since", "5m"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["requests"] == 3 and summary["offload_share"] == pytest.approx(1 / 3)
    assert summary["cache_hit_share"] == pytest.approx(1 / 3) and summary["fallbacks"] == 1
    assert summary["ttft_by_route"]["local"]["p50_s"] == pytest.approx(0.1) and summary["link_bytes"] == 1000
    assert summary["prediction_error"]["count"] == 3 and summary["prediction_error"]["median_s"] == pytest.approx(0.1)
    assert (summary["index_unavailable"], summary["index_not_asked"]) == (1, 1)
    assert summary["skipped_events"] == 1  # the v1 event is named as skipped, not miscounted


async def test_tail_prints_one_line_per_event(nc, nats_url):
    """Tail prints each decision and outcome as one readable line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "libs.cli",
        "decisions",
        "tail",
        "--nats",
        nats_url,
        "--site",
        "dc-pd",
        "--count",
        "2",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        log = DecisionLog(nc, "dc-pd", max_age_s=3600, max_bytes=1 << 20)
        async with asyncio.timeout(30):
            lines = []
            while len(lines) < 2:  # resend until the tail's subscription is in place
                await log.decision(_decision("req-tail-1", "remote"))
                await log.outcome(_outcome("req-tail-1", "remote", 0.25, 10))
                try:
                    async with asyncio.timeout(0.5):
                        lines.append((await proc.stdout.readline()).decode())
                except TimeoutError:
                    continue
        # the tail may subscribe between a decision and the outcome that follows it: either comes first
        [decide] = [line for line in lines if " decide  req-tail-1 remote" in line]
        [outcome] = [line for line in lines if " outcome req-tail-1 remote   ok ttft=250ms" in line]
        assert "pred_ttft=200ms" in decide and "tokens=0+3" in outcome
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def test_bad_since_is_refused():
    """--since must be a positive duration."""
    assert parse_duration_s("10m") == 600 and parse_duration_s("1.5h") == 5400
    with pytest.raises(BadRequest):
        parse_duration_s("yesterday")
    assert main(["decisions", "summary", "--since", "0s"]) == 2
