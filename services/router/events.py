"""Decision, outcome and plan events (JSON) on the bus, kept by the JetStream stream PRFAAS_DECISIONS."""

from __future__ import annotations

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
    """Publishes the router's events; the stream captures them without the router waiting for acks."""

    def __init__(self, nc: NatsClient, site: str, *, max_age_s: float, max_bytes: int) -> None:
        self.nc = nc
        self._decisions = subjects.decisions(site)
        self._outcomes = subjects.outcomes(site)
        self._plans = subjects.plans(site)
        self._stream = decisions_stream_config(max_age_s, max_bytes)

    async def ensure_stream(self) -> None:
        """Create or update the stream (idempotent; several routers may do it)."""
        await ensure_stream(self.nc.jetstream(), self._stream)

    async def _publish(self, subject: str, event) -> None:
        try:
            await self.nc.publish(subject, json_encoder.encode(event))
        except nats.errors.Error as e:  # an event lost to a bus outage must not fail the request
            log.warning("event not published", extra={"subject": subject, "error": repr(e)})

    async def decision(self, event: DecisionEvent) -> None:
        """Publish a decision (before it is acted on)."""
        await self._publish(self._decisions, event)

    async def outcome(self, event: OutcomeEvent) -> None:
        """Publish how a request ended."""
        await self._publish(self._outcomes, event)

    async def plan(self, event: ThresholdChanged) -> None:
        """Publish a re-planned threshold."""
        await self._publish(self._plans, event)
