"""Prefill gateways keep KV traffic to a destination site within the pair's budget (BUDGETS), measured at the receiver."""

from __future__ import annotations

import asyncio
import contextlib
import time

from libs.common.errors import TransferFailed
from libs.common.messages import KvDestination, PrefillFinished, PrefillJob, prefill_status_decoder
from libs.kvwire import KvReceiver, ReceiverConfig, TcpReceiverServer
from services.prefill_gateway.client import PrefillGatewayClient

BUDGET_GBPS = 0.2
TOKENS = 2048  # ~2.1 MB per transfer at this byte scale: ~86 ms of budget each


async def _delivered_gbps(gateways, sites, processes: list[tuple[str, ...]], jobs_per_instance: int) -> float:
    """Start one prefill gateway per instance tuple, send them all jobs at once, return the rate delivered."""
    # Two instances per process keep each process's link busy without a gap (no bucket refill between jobs).
    sim = {
        "backend": "simulated:h200",
        "model": "kimi-linear-1t",
        "byte_scale": 1e-2,
        "time_scale": 0.0,
        "budgets": f"dc-pd={BUDGET_GBPS}",
        "queue_limit": jobs_per_instance,
    }
    await asyncio.gather(*[gateways.prefill("budget", ",".join(names), **sim) for names in processes])
    receiver = KvReceiver(ReceiverConfig(max_total_bytes=256 << 20, transfer_timeout_s=60))
    status = await sites.decode_nc.subscribe("test.budget.status")
    client = PrefillGatewayClient(sites.decode_nc)
    instances = [i for names in processes for i in names]
    jobs = [(instance, f"{instance}-{i}") for i in range(jobs_per_instance) for instance in instances]
    samples: list[tuple[float, int]] = []

    def received() -> int:
        """Bytes received so far: transfers released plus those still arriving."""
        total = receiver.totals.received_bytes
        for _, rid in jobs:
            with contextlib.suppress(TransferFailed):
                total += receiver.assembly(f"t{rid}").received_bytes
        return total

    async def sample() -> None:
        while True:
            samples.append((time.monotonic(), max(received(), samples[-1][1] if samples else 0)))
            await asyncio.sleep(0.005)  # socket threads fill the receiver: there is no event to await

    async def claim(transfer_id: str) -> None:
        (await receiver.wait(transfer_id, timeout_s=60)).release()

    async with receiver, TcpReceiverServer(receiver) as server:
        host, port = server.address
        claims = [asyncio.create_task(claim(f"t{rid}")) for _, rid in jobs]
        sampler = asyncio.create_task(sample())
        for instance, rid in jobs:
            await client.submit(
                "dc-prfaas",
                "budget",
                PrefillJob(
                    request_id=rid,
                    transfer_id=f"t{rid}",
                    model="kimi-linear-1t",
                    prompt_tokens=[sum(map(ord, rid))] + list(range(TOKENS - 1)),
                    destination=KvDestination(site="dc-pd", instance="probe", host=host, port=port),
                    status_subject="test.budget.status",
                ),
                instance=instance,
            )
        async with asyncio.timeout(60):
            for _ in jobs:
                assert isinstance(
                    prefill_status_decoder.decode((await status.next_msg(timeout=30)).data), PrefillFinished
                )
            await asyncio.gather(*claims)
        sampler.cancel()
    # The rate between 20% and 80% of all bytes: every instance sends all along, and the buckets'
    # initial bursts (512 KiB each) fall outside the window.
    total = samples[-1][1]
    t20, b20 = next((t, b) for t, b in samples if b >= 0.2 * total)
    t80, b80 = next((t, b) for t, b in samples if b >= 0.8 * total)
    return (b80 - b20) * 8 / (t80 - t20) / 1e9


async def test_one_gateway_process_stays_within_its_pair_budget(gateways, sites):
    """Two instances of one gateway sending at once to one destination site deliver the pair's budget, within 5%."""
    rate_gbps = await _delivered_gbps(gateways, sites, [("budget-a1", "budget-a2")], jobs_per_instance=8)
    assert 0.95 * BUDGET_GBPS <= rate_gbps <= 1.05 * BUDGET_GBPS


async def test_two_processes_at_one_site_stay_within_one_pair_budget(gateways, sites):
    """Two gateway processes at one site sending at once to one destination site share its budget, within 5%."""
    rate_gbps = await _delivered_gbps(gateways, sites, [("budget-b1", "budget-b2"), ("budget-c1", "budget-c2")], 4)
    assert 0.95 * BUDGET_GBPS <= rate_gbps <= 1.05 * BUDGET_GBPS
