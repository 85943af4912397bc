"""A prefill gateway keeps no work nobody waits for: its queue drains after cancels lost or late and decode sides gone.

A stopped (suspended) gateway reads, when it resumes, every message that reached its socket at
once: a job and the cancel its caller sent after giving up on it. The gateway here is in this
process on a real nats-server, so a blocking sleep suspends it the same way, without SIGSTOP.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import msgspec
import pytest

from libs.bench.gateways import gateway_env
from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.errors import TransferFailed
from libs.common.messages import (
    InstanceLoad,
    JobCancel,
    KvDestination,
    PrefillJob,
    encode,
    instance_load_decoder,
    prefill_status_decoder,
)
from libs.engine.build import build_backend
from libs.kvwire import Destination, TcpTransport
from libs.kvwire.tcp_send import TcpConfig
from libs.lab.servers import free_port
from services.prefill_gateway.client import PrefillGatewayClient
from services.prefill_gateway.config import PrefillGatewayConfig
from services.prefill_gateway.job import CANCELLED
from services.prefill_gateway.service import PrefillGatewayService

SITE, CLUSTER, INSTANCE = "dc-prfaas", "stale", "stale-p0"
MODEL = "kimi-linear-1t"
JOBS = 4
PROMPT = list(range(4096))
SUSPENDED_S = 0.3  # the gateway's loop is blocked this long: every job and cancel is in its socket when it resumes
JOB_TIMEOUT_S = 2.0
SUSPENSION_LIMIT_S = 1.0  # the gateway's PREFILL_GATEWAY_SUSPENDED_S: over 3x the suspension above


@pytest.fixture
async def gateway(nats_url: str) -> AsyncIterator[PrefillGatewayService]:
    """A simulated prefill gateway in this process (0.1 s heartbeats)."""
    config = PrefillGatewayConfig.from_env(
        gateway_env(
            "prefill_gateway",
            nats_url,
            site=SITE,
            cluster=CLUSTER,
            instances=INSTANCE,
            heartbeat_s=0.1,
            backend="simulated:h200",
            model=MODEL,
            byte_scale=1e-2,
            time_scale=4.0,
            drain_timeout_s=0,
            suspended_s=SUSPENSION_LIMIT_S,
        )
    )
    backend = build_backend(config.backend)
    nc = await connect(nats_url, name="stale-prefill")
    try:
        async with PrefillGatewayService(nc, {INSTANCE: backend}, config) as service:
            yield service
    finally:
        await nc.close()
        await backend.close()


def _job(i: int, port: int) -> PrefillJob:
    """A long job whose decode side is gone (nothing listens at ``port``)."""
    return PrefillJob(
        request_id=f"stale-{i}",
        transfer_id=f"stale-t{i}",
        model=MODEL,
        prompt_tokens=PROMPT,
        destination=KvDestination(site="dc-pd", instance="gone-d0", host="127.0.0.1", port=port),
        timeout_s=JOB_TIMEOUT_S,
    )


async def _drained(nc, timeout_s: float, after: float = 0.0) -> InstanceLoad:
    """The first heartbeat with an empty queue stamped after wall time ``after``, within ``timeout_s``."""
    sub = await nc.subscribe(subjects.load(SITE, INSTANCE))
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                load = instance_load_decoder.decode((await sub.next_msg(timeout=timeout_s)).data)
                if load.queue_depth == 0 and load.ts > after:
                    return load
    finally:
        await sub.unsubscribe()


async def test_jobs_cancelled_while_the_gateway_was_suspended_leave_its_queue(nats_url, gateway):
    """Jobs read together with their cancels after a suspension are gone from the queue (heartbeat) and the table."""
    nc = await connect(nats_url, name="stale-caller")
    try:
        await settle(nc)
        port = free_port()
        subject = subjects.prefill_instance_jobs(SITE, CLUSTER, INSTANCE)
        for i in range(JOBS):
            await nc.publish(subject, encode(_job(i, port)), reply=nc.new_inbox())
            await nc.publish(subjects.JOB_CANCEL, encode(JobCancel(request_id=f"stale-{i}", reason="fell back")))
        await nc.flush()
        time.sleep(SUSPENDED_S)  # noqa: ASYNC251 -- suspends the gateway's loop: it resumes with every message read
        # Cancelled jobs leave at once; the upper bound is the jobs' own deadline, 3x.
        load = await _drained(nc, 3 * JOB_TIMEOUT_S)
        assert load.expected_wait_s == 0.0
        assert gateway.instances[INSTANCE].queue == []
        assert len(gateway.runs) == 0  # its jobs' tasks ended as they left the queue
    finally:
        await nc.close()


async def test_jobs_whose_cancels_were_lost_and_whose_decode_side_is_silent_leave_within_their_deadline(
    nats_url, gateway
):
    """Jobs nobody cancels, sent to a decode endpoint that accepts and never answers, end at their deadline."""
    nc = await connect(nats_url, name="stale-caller")
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nothing reads or answers
    try:
        await settle(nc)
        port = silent.getsockname()[1]
        subject = subjects.prefill_instance_jobs(SITE, CLUSTER, INSTANCE)
        for i in range(JOBS):
            await nc.request(subject, encode(_job(i, port)), timeout=5)
        started = time.monotonic()
        # Each job ends at its own deadline, counted from its receipt; 3x is safe on a loaded 2-core machine.
        await _drained(nc, 3 * JOB_TIMEOUT_S)
        assert time.monotonic() - started < 3 * JOB_TIMEOUT_S
    finally:
        silent.close()
        await nc.close()


async def test_a_job_resent_after_its_compute_ended_is_accepted_again(nats_url, gateway):
    """A resend of a job held past its compute (its transfer unanswered) gets its acceptance, not an error."""
    nc = await connect(nats_url, name="stale-caller")
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        await settle(nc)
        client = PrefillGatewayClient(nc, timeout_s=5.0)
        job = msgspec.structs.replace(_job(0, silent.getsockname()[1]), timeout_s=30.0)
        await client.submit(SITE, CLUSTER, job, instance=INSTANCE)
        await _drained(nc, 3 * JOB_TIMEOUT_S, after=time.time())  # computed: off the queue, its transfer waits
        assert gateway.runs.get(job.request_id) is not None
        again = await client.submit(SITE, CLUSTER, job, instance=INSTANCE)
        assert (again.instance, again.queue_position) == (INSTANCE, 0)
    finally:
        silent.close()
        await nc.close()


async def test_a_gateway_suspended_past_its_limit_ends_the_jobs_it_held(nats_url, gateway):
    """Jobs held through a suspension longer than ``SUSPENDED_S`` end (``cancelled``) on resuming, not at their deadline."""
    nc = await connect(nats_url, name="stale-caller")
    silent = socket.create_server(("127.0.0.1", 0))
    statuses = await nc.subscribe("stale.status.*")
    try:
        await settle(nc)
        client = PrefillGatewayClient(nc, timeout_s=5.0)
        for i in range(JOBS):
            job = msgspec.structs.replace(
                _job(i, silent.getsockname()[1]), timeout_s=60.0, status_subject=f"stale.status.{i}"
            )
            await client.submit(SITE, CLUSTER, job, instance=INSTANCE)
        time.sleep(2 * SUSPENSION_LIMIT_S)  # noqa: ASYNC251 -- the gateway's loop does not run: a stopped process
        resumed = time.time()
        # Ended as the loop runs again; the bound is far below the jobs' 60 s deadline and 3x safe.
        await _drained(nc, 3 * JOB_TIMEOUT_S, after=resumed)
        async with asyncio.timeout(3 * JOB_TIMEOUT_S):
            codes = [prefill_status_decoder.decode((await statuses.next_msg()).data).code for _ in range(JOBS)]
        assert codes == [CANCELLED] * JOBS
    finally:
        await statuses.unsubscribe()
        silent.close()
        await nc.close()


async def test_an_abort_to_a_silent_receiver_gives_up_within_the_connect_deadline():
    """An abort's thread waits for a receiver that never answers no longer than the connect deadline."""
    silent = socket.create_server(("127.0.0.1", 0))
    transport = TcpTransport(TcpConfig(connect_timeout_s=0.5, io_timeout_s=30.0))
    try:
        started = time.monotonic()
        with pytest.raises(TransferFailed):
            await transport.abort("stale-t0", Destination("dc-pd", "gone-d0", *silent.getsockname()[:2]), "test")
        assert time.monotonic() - started < 3 * 0.5  # not the 30 s of a transfer's io deadline
    finally:
        await transport.close()
        silent.close()
