"""A KV transfer is a span of its request's trace with its figures, counted per site pair on /metrics, within budget."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from opentelemetry import trace

from libs.common import subjects
from libs.common.hashing import hash_list
from libs.common.messages import BlocksStored, LinkStats, PrefillFinished, kv_event_batch_decoder, link_stats_decoder
from libs.engine.build import BackendSpec, build_backend
from libs.kvwire import LinkConfig
from libs.lab.servers import free_port
from tests.gateways.conftest import caller_for

CLUSTER, PREFILL, DECODE = "xfer", "xfer-p0", "xfer-d0"
MODEL = "kimi-linear-1t"
SIM = {"model": MODEL, "byte_scale": 0.1, "time_scale": 0.01}
BUDGET_GBPS = 0.2  # 25 MB/s: the first prompt's ~25 MB take ~1 s, the second's ~21.6 MB ~0.86 s
_LINKS = LinkConfig()
# The prefill gateway's bucket: 20 ms of budget deep (at least 256 KiB), its only allowance over the budget.
BURST_BYTES = max(_LINKS.burst_s * BUDGET_GBPS * 1e9 / 8, _LINKS.min_burst_bytes)
METRICS = free_port()
FIRST = list(range(4096))
SECOND = FIRST + list(range(10_000, 12_048))  # its first 64 blocks are held by the decode instance after FIRST


@pytest.fixture(scope="module")
def paced_pair(module_gateways, otlp):
    """A simulated prefill gateway paced at 0.2 Gbps towards dc-pd (4 stripes), and a decode gateway; both traced."""
    receiver, _ = otlp
    tracing = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}

    async def start() -> None:
        await asyncio.gather(
            module_gateways.prefill(
                CLUSTER,
                PREFILL,
                env=tracing,
                backend="simulated:h200",
                budgets=f"dc-pd={BUDGET_GBPS}",
                tcp_small_bytes=0,
                metrics_port=METRICS,
                link_stats_s=0.25,
                **SIM,
            ),
            module_gateways.decode(DECODE, env=tracing, backend="simulated:h20", **SIM),
        )

    asyncio.run(start())
    return module_gateways


def _within_budget(goodput_gbps: float, duration_s: float) -> bool:
    """At most the budget plus the bucket's burst over the transfer's duration."""
    return goodput_gbps <= BUDGET_GBPS + BURST_BYTES * 8 / 1e9 / duration_s


async def _metrics() -> dict[tuple[str, frozenset[str]], float]:
    """The prefill gateway's /metrics samples by name and set of labels (``key="value"``)."""
    url = f"http://127.0.0.1:{METRICS}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            samples[(name, frozenset(labels.rstrip("}").split(",")) - {""})] = float(value)
    return samples


def _pair(samples: dict, name: str, *labels: str) -> float:
    """A sample of the dc-prfaas -> dc-pd pair (0 if absent)."""
    return samples.get((name, frozenset({'src_site="dc-prfaas"', 'dst_site="dc-pd"', *labels})), 0.0)


async def _spans(receiver, trace_id: str, names: set[str]) -> dict[str, object]:
    """The spans of ``trace_id`` named in ``names``, once each has arrived."""
    found: dict[str, object] = {}
    async with asyncio.timeout(10):
        while not names <= set(found):
            found |= {s.name: s for s in receiver.take() if s.trace_id == trace_id and s.name in names}
            await asyncio.sleep(0.05)  # the gateways export in batches every 50 ms
    return found


async def _held_after(sites, caller) -> None:
    """Send FIRST and wait until the decode instance announces its blocks (what SECOND's reservation will hold)."""
    events = await sites.decode_nc.subscribe(subjects.kv_events("dc-pd", DECODE))
    try:
        await caller.request(FIRST, DECODE, model=MODEL, max_tokens=2)
        stored: set[int] = set()
        async with asyncio.timeout(10):
            while hash_list(FIRST)[-1] not in stored:
                batch = kv_event_batch_decoder.decode((await events.next_msg(timeout=10)).data)
                stored |= {
                    h
                    for e in batch.events
                    if isinstance(e, BlocksStored) and e.kind == "attn_kv"
                    for h in e.block_hashes
                }
    finally:
        await events.unsubscribe()


async def test_the_transfer_is_a_span_of_the_job_with_its_figures(paced_pair, sites, otlp):
    """Bytes sent and skipped (the held prefix), stripes, goodput within budget, pacing wait, retransmissions, resumes."""
    receiver, _ = otlp
    before = await _metrics()
    sub = await sites.prefill_nc.subscribe(subjects.link("dc-prfaas", "dc-pd"))
    async with caller_for(sites, CLUSTER) as caller:
        await _held_after(sites, caller)
        receiver.take()
        with trace.get_tracer("test").start_as_current_span("router.route") as parent:
            out = await caller.request(SECOND, DECODE, model=MODEL, max_tokens=2)
    link_stats: list[LinkStats] = []
    async with asyncio.timeout(5):  # every interval until the one both transfers had ended in (this module's only)
        while not link_stats or link_stats[-1].transfers_completed_total < 2 or link_stats[-1].active_transfers:
            link_stats.append(link_stats_decoder.decode((await sub.next_msg(timeout=5)).data))
    await sub.unsubscribe()
    trace_id = format(parent.get_span_context().trace_id, "032x")
    spans = await _spans(receiver, trace_id, {"prefill_gateway.job", "prefill_gateway.transfer"})
    job, transfer = spans["prefill_gateway.job"], spans["prefill_gateway.transfer"]
    status = out.status
    assert isinstance(status, PrefillFinished) and out.reservation.held_blocks == 64
    assert transfer.parent_span_id == job.span_id
    a = transfer.attributes
    backend = build_backend(BackendSpec(backend="simulated:h200", model=MODEL, byte_scale=SIM["byte_scale"]))
    whole = sum(s.nbytes for s in backend.plan_parts(len(SECOND)))
    assert a["prfaas.request_id"] == out.request_id and a["prfaas.kv.dst_site"] == "dc-pd"
    assert a["prfaas.kv.sent_bytes"] == status.sent_bytes == status.payload_bytes  # raw parts, nothing resent
    assert a["prfaas.kv.skipped_bytes"] == whole - status.payload_bytes > 0  # the held blocks' K/V stayed home
    assert a["prfaas.kv.stripes"] == 4 and a["prfaas.kv.resumes"] == 0
    assert a["prfaas.kv.goodput_gbps"] == pytest.approx(status.goodput_gbps)
    assert _within_budget(status.goodput_gbps, status.transfer_s)
    # Lower bound: the KV goes as fast as the budget lets it once computed (the prefill is ~0.1 s here).
    assert status.goodput_gbps >= 0.5 * BUDGET_GBPS
    # Nearly all of it waits for the budget: every byte past the first burst (0.3 of the ideal is a loose floor).
    ideal_s = (status.sent_bytes - BURST_BYTES) * 8 / (BUDGET_GBPS * 1e9)
    assert 0.3 * ideal_s <= a["prfaas.kv.pacing_wait_s"] <= status.transfer_s
    assert isinstance(a["prfaas.kv.retransmits"], int) and a["prfaas.kv.retransmits"] >= 0  # Linux tells (TCP_INFO)
    after = await _metrics()
    seconds, goodput = "prfaas_prefill_gateway_transfer_seconds", "prfaas_prefill_gateway_goodput_gbps"
    for name in (f"{seconds}_count", f"{goodput}_count"):
        assert _pair(after, name) - _pair(before, name) == 2  # FIRST and SECOND
    added = _pair(after, f"{goodput}_sum") - _pair(before, f"{goodput}_sum")
    # Both transfers' goodput, each within the budget (plus the burst over its ~1 s): at most twice that.
    assert status.goodput_gbps < added <= 2 * (BUDGET_GBPS + BURST_BYTES * 8 / 1e9 / 0.8)
    assert _pair(after, f"{goodput}_bucket", 'le="0.25"') == _pair(after, f"{goodput}_count")  # none above 0.25
    assert sum(s.goodput_gbps * s.interval_s for s in link_stats) * 1e9 / 8 >= 2 * status.sent_bytes  # both seen
    for s in link_stats:  # any figure within the budget plus one burst over the time it is over
        busy_s = s.goodput_gbps * s.interval_s / s.busy_goodput_gbps if s.busy_goodput_gbps else 1.0
        assert _within_budget(s.goodput_gbps, s.interval_s) and _within_budget(s.busy_goodput_gbps, busy_s), s
        assert s.limited_goodput_gbps <= BUDGET_GBPS, s
