"""Client of prefill gateways: hand a job to a cluster (queue group) or to one of its instances."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient

from libs.common import subjects
from libs.common.handling import ask
from libs.common.messages import PrefillAccepted, PrefillJob, prefill_job_reply_decoder


class PrefillGatewayClient:
    """Send ``PrefillJob``s over NATS request/reply (the outcome comes on the job's status subject)."""

    def __init__(self, nc: NatsClient, timeout_s: float = 2.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s

    async def submit(self, site: str, cluster: str, job: PrefillJob, instance: str | None = None) -> PrefillAccepted:
        """The gateway's acceptance; raises the typed error it answered (no_capacity, bad_request),
        ``Unreachable`` if nobody listens, ``UpstreamTimeout`` past the deadline."""
        subject = (
            subjects.prefill_instance_jobs(site, cluster, instance)
            if instance
            else subjects.prefill_jobs(site, cluster)
        )
        where = f"prefill instance {site}/{instance}" if instance else f"prefill cluster {site}/{cluster}"
        return await ask(self.nc, subject, job, prefill_job_reply_decoder, self.timeout_s, where)
