"""Client of prefill gateways: hand a job to a cluster (queue group) or to one of its instances."""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NatsClient

from libs.common import subjects
from libs.common.errors import Unreachable, UpstreamTimeout, error_from_code
from libs.common.messages import ErrorReply, PrefillAccepted, PrefillJob, encode, prefill_job_reply_decoder
from libs.common.telemetry import inject_headers


class PrefillGatewayClient:
    """Send ``PrefillJob``s over NATS request/reply (the outcome comes on the job's status subject)."""

    def __init__(self, nc: NatsClient, timeout_s: float = 2.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s

    async def submit(self, site: str, cluster: str, job: PrefillJob, instance: str | None = None) -> PrefillAccepted:
        """The gateway's acceptance; raises the typed error it answered (no_capacity, bad_request),
        ``Unreachable`` if nobody listens, ``UpstreamTimeout`` past the deadline."""
        subject = subjects.prefill_instance_jobs(site, cluster, instance) if instance else subjects.prefill_jobs(site, cluster)
        where = f"prefill instance {site}/{instance}" if instance else f"prefill cluster {site}/{cluster}"
        try:
            msg = await self.nc.request(subject, encode(job), timeout=self.timeout_s, headers=inject_headers())
        except nats.errors.NoRespondersError as e:
            raise Unreachable(f"{where} is not listening") from e
        except nats.errors.TimeoutError as e:
            raise UpstreamTimeout(f"{where} did not answer within {self.timeout_s}s") from e
        reply = prefill_job_reply_decoder.decode(msg.data)
        if isinstance(reply, ErrorReply):
            raise error_from_code(reply.code, reply.message)
        return reply
