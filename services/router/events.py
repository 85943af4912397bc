"""Decision, outcome and plan events (JSON) on the bus, kept by the JetStream stream PRFAAS_DECISIONS."""

from __future__ import annotations

import asyncio
import logging

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import api

from libs.common import subjects
from libs.common.bus import ensure_stream
from libs.common.messages import DecisionEvent, OutcomeEvent, ThresholdChanged, json_encoder

log = logging.getLogger(__name__)


def decisions_stream_config(max_age_s: float, max_bytes: int) -> api.StreamConfig:
    """The stream analytics replay: every site's decisions, outcomes and plans, bounded by age and size."""
    return api.StreamConfig(
        name=subjects.DECISIONS_STREAM,
        subjects=[subjects.DECISIONS_ALL, subjects.OUTCOMES_ALL, subjects.PLANS_ALL],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        max_age=max_age_s,
        max_bytes=max_bytes,
        discard=api.DiscardPolicy.OLD,
    )


class DecisionLog:
    """Publishes the router's events; the stream captures them without the router waiting for acks.

    Outcomes are not urgent: each waits for the next decision, which is published just before a
    decode job, so both leave in the same write on the bus, or at most ``outcome_delay_s``.
    """

    def __init__(
        self, nc: NatsClient, site: str, *, max_age_s: float, max_bytes: int, outcome_delay_s: float = 0.05
    ) -> None:
        self.nc = nc
        self._decisions = subjects.decisions(site)
        self._outcomes = subjects.outcomes(site)
        self._plans = subjects.plans(site)
        self._stream = decisions_stream_config(max_age_s, max_bytes)
        self._outcome_delay_s = outcome_delay_s
        self._outbox: list[bytes] = []
        self._timer: asyncio.Task | None = None

    async def ensure_stream(self) -> None:
        """Create or update the stream (idempotent; several routers may do it)."""
        await ensure_stream(self.nc.jetstream(), self._stream)

    async def _publish(self, subject: str, body: bytes) -> None:
        try:
            await self.nc.publish(subject, body)
        except nats.errors.Error as e:  # an event lost to a bus outage must not fail the request
            log.warning("event not published", extra={"subject": subject, "error": repr(e)})

    async def decision(self, event: DecisionEvent) -> None:
        """Publish a decision (before it is acted on), with the outcomes waiting."""
        await self._send_outcomes()
        await self._publish(self._decisions, json_encoder.encode(event))

    async def outcome(self, event: OutcomeEvent) -> None:
        """Queue how a request ended (published with the next decision, or after ``outcome_delay_s``)."""
        self._outbox.append(json_encoder.encode(event))
        if self._timer is None:
            self._timer = asyncio.ensure_future(self._send_outcomes_later())

    async def plan(self, event: ThresholdChanged) -> None:
        """Publish a re-planned threshold."""
        await self._publish(self._plans, json_encoder.encode(event))

    async def close(self) -> None:
        """Publish the outcomes still waiting (idempotent)."""
        await self._send_outcomes()

    async def _send_outcomes_later(self) -> None:
        await asyncio.sleep(self._outcome_delay_s)
        self._timer = None
        await self._send_outcomes()

    async def _send_outcomes(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer is not asyncio.current_task():
            timer.cancel()
        outbox, self._outbox = self._outbox, []
        for body in outbox:
            await self._publish(self._outcomes, body)
