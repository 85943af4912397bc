"""Failures end in typed errors within deadlines and free what they held: killed peers, leases, full instances, drain."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import numpy as np
import pytest

from libs.common import subjects
from libs.common.bus import settle
from libs.common.errors import BadRequest, NoCapacity
from libs.common.messages import DecodeFinished, ErrorReply, JobCancel, PrefillFinished, encode, link_stats_decoder
from libs.common.state_parts import PartSpec, StatePart
from libs.engine.profiles import hardware_profile, model_profile
from libs.kvwire import Destination, KvLinks, KvSender, TcpTransport
from libs.lab.servers import free_port
from tests.gateways.conftest import caller_for, next_load

MODEL = "kimi-linear-1t"
SIM = {"model": MODEL, "byte_scale": 1e-2}
LEASE_S = 0.5
KV_MEMORY = 16 << 20
SLOW = 6.0  # prefill time scale: an 8K prompt takes ~4.4 s, its transfer as long
STATS_S = 0.05  # the prefill gateways' LinkStats period: how soon a test sees the receiver's first bytes
PROMPT = list(range(8192))
SLOW_PREFILL_S = model_profile(MODEL).prefill_time_s(len(PROMPT), hardware_profile("h200")) * SLOW


METRICS = {"prefill": free_port(), "decode": free_port()}


@pytest.fixture(scope="module")
def pair(module_gateways):
    """A slow simulated prefill cluster and a small decode instance (2 slots, 16 MiB, 0.5 s leases), with /metrics."""

    async def start() -> None:
        await asyncio.gather(
            module_gateways.prefill(
                "slow",
                "slow-p0",
                backend="simulated:h200",
                time_scale=SLOW,
                metrics_port=METRICS["prefill"],
                link_stats_s=STATS_S,
                **SIM,
            ),
            module_gateways.decode(
                "small-d0",
                backend="simulated:h20",
                max_batch=2,
                kv_memory_bytes=KV_MEMORY,
                lease_s=LEASE_S,
                metrics_port=METRICS["decode"],
                **SIM,
            ),
        )

    asyncio.run(start())
    return module_gateways


async def _metric(role: str, line_start: str) -> float:
    """The value of the first /metrics sample line starting with ``line_start`` (0 if absent)."""
    url = f"http://127.0.0.1:{METRICS[role]}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    return next((float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(line_start)), 0.0)


class ReceiverBytes:
    """Watches the prefill site's LinkStats towards the decode site for KV bytes the receiver acknowledged."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.sub = None

    async def __aenter__(self) -> ReceiverBytes:
        self.sub = await self.nc.subscribe(subjects.link("dc-prfaas", "dc-pd"))
        await settle(self.nc)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.sub.unsubscribe()

    async def arrived(self, timeout_s: float = 10.0) -> None:
        """Until a sender reports a transfer still active and more bytes acknowledged than when first heard or idle."""
        before: dict[str, int] = {}
        async with asyncio.timeout(timeout_s):
            while True:
                stats = link_stats_decoder.decode((await self.sub.next_msg(timeout=timeout_s)).data)
                if (
                    before.setdefault(stats.sender, stats.acked_bytes_total) < stats.acked_bytes_total
                    and stats.active_transfers
                ):
                    return
                if not stats.active_transfers:
                    before[stats.sender] = stats.acked_bytes_total


async def test_killed_prefill_ends_the_request_with_transfer_failed_and_frees_the_slot(pair, gateways, sites):
    """kill -9 of the prefill gateway mid-transfer: TransferFailed within the lease, slot and memory back."""
    proc, _ = await gateways.prefill(
        "doomed", "doomed-p0", backend="simulated:h200", time_scale=SLOW, link_stats_s=STATS_S, **SIM
    )
    async with caller_for(sites, "doomed") as caller, ReceiverBytes(sites.prefill_nc) as receiver:
        request = asyncio.create_task(caller.request(PROMPT, "small-d0", model=MODEL, wait_status=False))
        await receiver.arrived()  # the decode side holds some of the KV, the rest is still coming
        proc.kill()
        killed = time.monotonic()
        out = await request
    assert isinstance(out.final, ErrorReply) and out.final.code == "transfer_failed"
    assert "lease expired" in out.final.message
    # The lease runs from the last byte received; 1 s covers polling and a loaded machine.
    assert time.monotonic() - killed <= LEASE_S + 1.0
    load = await next_load(sites.decode_nc, "dc-pd", "small-d0", after=time.time())
    assert (load.free_decode_slots, load.reserved, load.free_kv_bytes) == (2, 0, KV_MEMORY)


async def test_killed_decode_aborts_the_prefill_and_frees_the_instance(pair, gateways, sites):
    """kill -9 of the decode gateway mid-transfer: the prefill job fails fast, its compute stops, its queue empties."""
    proc, _ = await gateways.decode("doomed-d0", backend="simulated:h20", **SIM)
    async with caller_for(sites, "slow") as caller, ReceiverBytes(sites.prefill_nc) as receiver:
        request = asyncio.create_task(caller.request(PROMPT, "doomed-d0", model=MODEL, timeout_s=30, wait_final=False))
        await receiver.arrived()  # the transfer is under way
        proc.kill()
        killed = time.monotonic()
        out = await request
    assert isinstance(out.status, ErrorReply) and out.status.code == "transfer_failed"
    # The compute stopped: the job ended well before the ~4.4 s modelled prefill would have.
    assert time.monotonic() - killed < SLOW_PREFILL_S - 1.0
    load = await next_load(sites.prefill_nc, "dc-prfaas", "slow-p0", after=time.time())
    assert load.queue_depth == 0 and load.expected_wait_s == 0


async def test_a_reservation_without_kv_expires_with_its_lease(pair, sites):
    """A decode job whose prefill never comes ends with TransferFailed once its lease runs out, and frees its slot."""
    async with caller_for(sites, "slow") as caller:
        out = await caller.request(PROMPT, "small-d0", model=MODEL, send_prefill=False, lease_s=0.3)
    assert (
        isinstance(out.final, ErrorReply)
        and out.final.code == "transfer_failed"
        and "lease expired" in out.final.message
    )
    assert 0.3 <= out.end_s <= 0.3 + 1.0  # never early; 1 s covers polling and a loaded machine
    load = await next_load(sites.decode_nc, "dc-pd", "small-d0", after=time.time())
    assert load.free_decode_slots == 2


async def test_an_expired_lease_stops_the_prefill_job_too(pair, sites):
    """A job queued at the prefill side past its decode lease is dropped there at once, not computed."""
    async with caller_for(sites, "slow") as caller:
        ahead = asyncio.create_task(
            caller.request(PROMPT, "small-d0", model=MODEL, lease_s=5.0, request_id="ahead", wait_final=False)
        )
        load = await next_load(sites.prefill_nc, "dc-prfaas", "slow-p0", after=time.time())
        while load.queue_depth == 0:  # "ahead" is computing
            load = await next_load(sites.prefill_nc, "dc-prfaas", "slow-p0", after=load.ts)
        behind = await caller.request(PROMPT[:4096], "small-d0", model=MODEL, lease_s=0.3)  # queued behind "ahead"
        await sites.decode_nc.publish(subjects.JOB_CANCEL, encode(JobCancel(request_id="ahead")))
        await ahead
    assert behind.final.code == "transfer_failed" and "lease expired" in behind.final.message
    assert isinstance(behind.status, ErrorReply) and "lease expired" in behind.status.message
    assert behind.status_s < 1.5  # at the lease (0.3 s), not after the ~4.4 s prefill queued ahead of it


async def test_a_full_decode_instance_answers_no_capacity_at_once(pair, sites):
    """With both slots reserved (or a transfer larger than its memory) a decode job is refused at once."""
    async with caller_for(sites, "slow") as caller:
        held = [
            asyncio.create_task(
                caller.request(PROMPT, "small-d0", model=MODEL, send_prefill=False, lease_s=5.0, request_id=f"held-{i}")
            )
            for i in range(2)
        ]
        load = await next_load(sites.decode_nc, "dc-pd", "small-d0", after=time.time())
        while load.free_decode_slots:
            load = await next_load(sites.decode_nc, "dc-pd", "small-d0", after=load.ts)
        start = time.monotonic()
        with pytest.raises(NoCapacity, match="slots"):
            await caller.request(PROMPT, "small-d0", model=MODEL, send_prefill=False)
        assert time.monotonic() - start < 1.0  # an answer, not a timeout
        for i in range(2):
            await sites.decode_nc.publish(subjects.JOB_CANCEL, encode(JobCancel(request_id=f"held-{i}")))
        assert all(out.final.finish_reason == "cancelled" for out in await asyncio.gather(*held))
        with pytest.raises(NoCapacity, match="bytes"):
            await caller.request(list(range(131072)), "small-d0", model=MODEL, send_prefill=False)


async def test_sigterm_drains_requests_in_flight(gateways, sites):
    """SIGTERM to the prefill gateway mid-prefill and to the decode gateway mid-decode: the request completes."""
    prefill, _ = await gateways.prefill(
        "drain", "drain-p0", backend="simulated:h200", time_scale=1.0, link_stats_s=STATS_S, **SIM
    )
    decode, _ = await gateways.decode("drain-d0", backend="simulated:h20", time_scale=4.0, **SIM)
    async with caller_for(sites, "drain") as caller, ReceiverBytes(sites.prefill_nc) as receiver:
        first_token = asyncio.Event()
        start = time.monotonic()
        request = asyncio.create_task(
            caller.request(PROMPT, "drain-d0", model=MODEL, max_tokens=30, first_token=first_token)
        )
        await receiver.arrived()  # mid-prefill: layers stream as they are computed (~0.73 s in all)
        prefill.proc.terminate()
        prefill_terminated = time.monotonic() - start
        async with asyncio.timeout(10):
            await first_token.wait()
        decode.proc.terminate()  # ~0.9 s of decoding left
        decode_terminated = time.monotonic() - start
        out = await request
    assert isinstance(out.status, PrefillFinished) and out.status_s > prefill_terminated  # it was in flight at SIGTERM
    assert isinstance(out.final, DecodeFinished) and out.final.completion_tokens == 30
    assert out.end_s > decode_terminated
    assert await asyncio.to_thread(prefill.proc.wait, 10) == 0
    assert await asyncio.to_thread(decode.proc.wait, 10) == 0


async def test_metrics_count_refusals_failures_and_expired_leases(pair, sites):
    """/metrics of both gateways count jobs by outcome, failures by code and expired leases."""
    expired = "prfaas_decode_gateway_leases_expired_total "
    failed = 'prfaas_decode_gateway_failures_total{code="transfer_failed"}'
    refused = 'prfaas_prefill_gateway_jobs_total{outcome="bad_request"}'
    before = [await _metric("decode", expired), await _metric("decode", failed), await _metric("prefill", refused)]
    async with caller_for(sites, "slow") as caller:  # its reachability probe is one malformed prefill job
        await caller.request(PROMPT[:256], "small-d0", model=MODEL, send_prefill=False, lease_s=0.2)
    after = [await _metric("decode", expired), await _metric("decode", failed), await _metric("prefill", refused)]
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1 and after[2] >= before[2] + 1


async def test_a_transfer_without_a_reservation_is_refused_before_it_takes_memory(pair, sites):
    """A sender that was given no reservation cannot fill a decode instance's receiver: BadRequest, no bytes held."""
    load = await next_load(sites.decode_nc, "dc-pd", "small-d0")
    part = StatePart(0, "attn_kv", "kv", np.zeros(1 << 20, np.uint8))
    async with KvLinks("dc-prfaas") as links:
        sender = KvSender(TcpTransport(), links)
        manifest = sender.manifest(
            transfer_id="stranger",
            dst_site="dc-pd",
            model=MODEL,
            block_size=64,
            num_tokens=1,
            specs=[PartSpec.of(part)],
            request_id="nobody",
        )
        with pytest.raises(BadRequest, match="transfer stranger has no reservation on small-d0"):
            await sender.send(manifest, [part], Destination("dc-pd", "small-d0", load.tcp_host, load.tcp_port))
    after = await next_load(sites.decode_nc, "dc-pd", "small-d0", after=time.time())
    assert after.free_kv_bytes == load.free_kv_bytes
