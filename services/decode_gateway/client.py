"""Client of decode gateways: reserve a decode slot for a job (its tokens come on the job's reply subject)."""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NatsClient

from libs.common import subjects
from libs.common.errors import Unreachable, UpstreamTimeout, error_from_code
from libs.common.messages import DecodeJob, DecodeReservation, ErrorReply, decode_job_reply_decoder, encode
from libs.common.telemetry import inject_headers


class DecodeGatewayClient:
    """Send ``DecodeJob``s over NATS request/reply."""

    def __init__(self, nc: NatsClient, timeout_s: float = 2.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s

    async def reserve(self, site: str, instance: str, job: DecodeJob) -> DecodeReservation:
        """The instance's reservation for ``job``; raises the typed error it answered (no_capacity, bad_request),
        ``Unreachable`` if nobody listens, ``UpstreamTimeout`` past the deadline."""
        try:
            msg = await self.nc.request(subjects.decode_jobs(site, instance), encode(job), timeout=self.timeout_s,
                                        headers=inject_headers())
        except nats.errors.NoRespondersError as e:
            raise Unreachable(f"decode instance {site}/{instance} is not listening") from e
        except nats.errors.TimeoutError as e:
            raise UpstreamTimeout(f"decode instance {site}/{instance} did not answer within {self.timeout_s}s") from e
        reply = decode_job_reply_decoder.decode(msg.data)
        if isinstance(reply, ErrorReply):
            raise error_from_code(reply.code, reply.message)
        return reply
