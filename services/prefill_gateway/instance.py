"""One prefill instance of a gateway process: its backend, its queue, its layer times, its cache events and its load."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from nats.aio.client import Client as NatsClient
from prometheus_client import Counter

from libs.common.messages import InstanceLoad
from libs.engine.backends import Backend
from libs.engine.build import BackendSpec
from libs.engine.events import KvEventPublisher
from libs.engine.profiles import hardware_profile
from services.prefill_gateway.layer_time import LayerClock, LayerTimes

_CALIBRATION_TOKENS = 1024  # a reference instance times one prefill this long before it predicts anything
KV_HELD_JOBS = 2  # the job computing and the one draining its transfer behind it


@dataclass(eq=False)
class QueuedJob:
    """What the queue knows of a job ahead: its uncached tokens and the cached ones they follow (one per job: by identity)."""

    uncached_tokens: int
    cached_tokens: int = 0


class PrefillInstance:
    """A backend that prefills one job at a time while the previous one's KV drains; later jobs queue up to the limit."""

    def __init__(
        self,
        nc: NatsClient,
        site: str,
        cluster: str,
        name: str,
        backend: Backend,
        spec: BackendSpec,
        bad_messages: Counter | None = None,
    ) -> None:
        self.site = site
        self.cluster = cluster
        self.name = name
        self.backend = backend
        self.spec = spec
        self.events = KvEventPublisher(nc, site, name, backend.cache, bad_messages)
        self.compute = asyncio.Semaphore(1)  # one prefill computes at a time
        # Jobs holding their KV: the one computing and one whose transfer still drains after its compute
        # (the instance computes the next prefill meanwhile, as an engine whose KV memory holds both).
        self.kv_held = asyncio.Semaphore(KV_HELD_JOBS)
        self.queue: list[QueuedJob] = []  # accepted and not yet computed, in arrival order
        time_scale = spec.time_scale if spec.simulated else 1.0
        self.times = LayerTimes(spec.model_profile, hardware_profile(spec.hardware_name), time_scale)

    async def calibrate(self) -> None:
        """Time one short prefill of a reference backend, so the first predictions are in this host's units.

        A simulated backend waits exactly its profile's time, so it needs none. The reference model's
        profile was fitted on a quiet machine; a shared host runs it several times slower.
        """
        if self.spec.simulated:
            return
        clock = LayerClock(self.times, _CALIBRATION_TOKENS, 0)
        tokens = [i % 256 for i in range(_CALIBRATION_TOKENS)]
        async with self.compute:
            async for parts in self.backend.prefill("calibration", tokens, use_cache=False):
                clock.lap(parts[0].layer)

    def expected_wait_s(self) -> float:
        """Seconds until a job accepted now would start (the predicted prefills of the jobs ahead, the computing one's whole)."""
        return sum(self.times.prefill_s(job.uncached_tokens, job.cached_tokens) for job in self.queue)

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
