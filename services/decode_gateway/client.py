"""Client of decode gateways: reserve a decode slot for a job (its tokens come on the job's reply subject), and ask
for a job's token chunks again when some were lost on the way."""

from __future__ import annotations

from nats.aio.client import Client as NatsClient

from libs.common import subjects
from libs.common.handling import ask
from libs.common.messages import (
    DecodeJob,
    DecodeReservation,
    ResendTokens,
    ResentTokens,
    decode_job_reply_decoder,
    resend_tokens_reply_decoder,
)


class DecodeGatewayClient:
    """Send ``DecodeJob``s and ``ResendTokens`` over NATS request/reply."""

    def __init__(self, nc: NatsClient, timeout_s: float = 2.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s

    async def reserve(self, site: str, instance: str, job: DecodeJob) -> DecodeReservation:
        """The instance's reservation for ``job``; raises the typed error it answered (no_capacity, bad_request),
        ``Unreachable`` if nobody listens, ``UpstreamTimeout`` past the deadline."""
        return await ask(
            self.nc,
            subjects.decode_jobs(site, instance),
            job,
            decode_job_reply_decoder,
            self.timeout_s,
            f"decode instance {site}/{instance}",
        )

    async def resend(self, site: str, instance: str, request_id: str, from_index: int) -> ResentTokens:
        """``request_id``'s token chunks from ``from_index`` again; ``NotFound`` when the instance no longer keeps
        them, ``Unreachable`` if nobody listens, ``UpstreamTimeout`` past the deadline."""
        return await ask(
            self.nc,
            subjects.decode_resend(site, instance),
            ResendTokens(request_id=request_id, from_index=from_index),
            resend_tokens_reply_decoder,
            self.timeout_s,
            f"decode instance {site}/{instance}",
        )
