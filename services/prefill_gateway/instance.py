"""One prefill instance of a gateway process: its backend, its queue, its cache events and its load."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient

from libs.common.messages import InstanceLoad
from libs.engine.backends import Backend
from libs.engine.build import BackendSpec
from libs.engine.events import KvEventPublisher

_RATE_GAIN = 0.3  # EWMA gain of the measured seconds per uncached token


@dataclass
class QueuedJob:
    """What the queue knows of a job ahead: its uncached tokens."""

    uncached_tokens: int


class PrefillInstance:
    """A backend that prefills one job at a time; later jobs queue behind it up to the queue limit."""

    def __init__(self, nc: NatsClient, site: str, cluster: str, name: str, backend: Backend, spec: BackendSpec) -> None:
        self.site = site
        self.cluster = cluster
        self.name = name
        self.backend = backend
        self.spec = spec
        self.events = KvEventPublisher(nc, site, name, backend.cache)
        self.slot = asyncio.Semaphore(1)
        self.queue: list[QueuedJob] = []  # accepted and not finished, in arrival order
        self.s_per_token = self._modelled_s_per_token()

    def _modelled_s_per_token(self) -> float:
        """A first estimate before any prefill was measured (the profile's, scaled; 0 for the reference)."""
        if not self.spec.simulated:
            return 0.0
        tokens = 8192
        return self.spec.model_profile.prefill_time_s(tokens, self.spec.hardware) * self.spec.time_scale / tokens

    def expected_wait_s(self) -> float:
        """Seconds until a job accepted now would start (the jobs ahead at the measured rate)."""
        return sum(job.uncached_tokens for job in self.queue) * self.s_per_token

    def measured(self, uncached_tokens: int, compute_s: float) -> None:
        """Fold one prefill's measured rate into the estimate."""
        if uncached_tokens > 0:
            rate = compute_s / uncached_tokens
            self.s_per_token = rate if self.s_per_token == 0 else self.s_per_token + _RATE_GAIN * (rate - self.s_per_token)

    def load(self) -> InstanceLoad:
        """This instance's heartbeat now."""
        return InstanceLoad(
            site=self.site,
            instance=self.name,
            role="prefill",
            cluster=self.cluster,
            queue_depth=len(self.queue),
            expected_wait_s=self.expected_wait_s(),
            ts=time.time(),
            hardware=self.spec.hardware_name,
            model=self.backend.model_name,
            block_size=self.backend.block_size,
            max_prompt_tokens=self.backend.max_prompt_tokens,
        )
