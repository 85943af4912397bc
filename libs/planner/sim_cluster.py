"""Simulated instances: FIFO prefill servers and continuously batching decode servers.

Decode is modelled as a fluid: every sequence in a batch of ``b`` advances one token per
``decode_step_s(b)``, so only admissions and completions are events (not every step).
"""

from __future__ import annotations

import heapq
from collections import deque

from libs.engine.profiles import HardwareProfile, ModelProfile
from libs.policy.view import InstanceView


class SimRequest:
    """One request's life in the simulator (times in simulated seconds)."""

    __slots__ = (
        "rid",
        "arrival_s",
        "prompt_tokens",
        "output_tokens",
        "cached",
        "remote",
        "prefill",
        "decode",
        "prefill_s",
        "prefill_start_s",
        "prefill_end_s",
        "first_token_s",
        "done_s",
        "admit_s",
        "target",
    )

    def __init__(self, rid: int, arrival_s: float, prompt_tokens: int, output_tokens: int, cached: dict) -> None:
        self.rid = rid
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.cached = cached
        self.remote = False
        self.prefill: PrefillServer | None = None
        self.decode: DecodeServer | None = None
        self.prefill_s = 0.0
        self.prefill_start_s = self.prefill_end_s = -1.0
        self.first_token_s = self.done_s = self.admit_s = -1.0
        self.target = 0.0

    @property
    def ttft_s(self) -> float:
        """Arrival to first token (-1 before it exists)."""
        return self.first_token_s - self.arrival_s if self.first_token_s >= 0 else -1.0


class PrefillServer:
    """One prefill instance: one request at a time, first come first served."""

    def __init__(self, name: str, site: str, hardware: HardwareProfile) -> None:
        self.name = name
        self.site = site
        self.hardware = hardware
        self.queue: deque[SimRequest] = deque()
        self.queued_work_s = 0.0
        self.current: SimRequest | None = None
        self.busy_until_s = 0.0

    def view(self, now: float) -> InstanceView:
        """What a router would know about this instance now."""
        wait = max(0.0, self.busy_until_s - now) + self.queued_work_s
        depth = len(self.queue) + (self.current is not None)
        return InstanceView(self.name, self.site, "prefill", self.hardware, queue_depth=depth, expected_wait_s=wait)

    def enqueue(self, req: SimRequest, now: float) -> SimRequest | None:
        """Queue ``req``; returns it if it starts right away."""
        self.queue.append(req)
        self.queued_work_s += req.prefill_s
        return self.start_next(now) if self.current is None else None

    def start_next(self, now: float) -> SimRequest | None:
        """Start the next queued request, if any (returns it)."""
        if not self.queue:
            self.current = None
            return None
        req = self.queue.popleft()
        self.queued_work_s = max(0.0, self.queued_work_s - req.prefill_s)
        self.current = req
        req.prefill_start_s = now
        req.prefill_end_s = now + req.prefill_s
        self.busy_until_s = req.prefill_end_s
        return req


class DecodeServer:
    """One decode instance with continuous batching up to the profile's max batch (fluid tokens)."""

    def __init__(self, name: str, site: str, hardware: HardwareProfile, model: ModelProfile) -> None:
        self.name = name
        self.site = site
        self.hardware = hardware
        self.model = model
        self.max_batch = model.max_batch(hardware)
        self.active: list[tuple[float, int, SimRequest]] = []  # heap of (target tokens, rid, request)
        self.waiting: deque[SimRequest] = deque()
        self.tokens = 0.0  # tokens every active sequence has produced since time zero (virtual clock)
        self.updated_s = 0.0
        self.version = 0
        self.pending = 0  # routed here, KV not yet arrived (a router counts its own assignments)
        self.mean_output_tokens = 1024.0  # running mean over admissions (for the wait estimate)
        self._step_s = {b: model.decode_step_s(b, hardware) for b in range(1, self.max_batch + 1)}

    def step_s(self) -> float:
        """Current decode step time (at the current batch)."""
        return self._step_s[max(1, len(self.active))]

    def view(self, now: float) -> InstanceView:
        """What a router would know about this instance now."""
        committed = len(self.active) + len(self.waiting) + self.pending
        free = max(0, self.max_batch - committed)
        wait = 0.0
        if free == 0:  # the next completion, then one completion per request ahead at full batch
            per_completion_s = self._step_s[self.max_batch] * self.mean_output_tokens / self.max_batch
            ahead = committed - self.max_batch
            wait = max(0.0, self.next_completion_s() - now) + ahead * per_completion_s
        return InstanceView(self.name, self.site, "decode", self.hardware, free_decode_slots=free, expected_wait_s=wait)

    def _advance(self, now: float) -> None:
        if self.active:
            self.tokens += (now - self.updated_s) / self.step_s()
        self.updated_s = now

    def arrive(self, req: SimRequest, now: float) -> None:
        """The request's KV is complete here: admit it or queue it for a slot."""
        self.pending -= 1
        self._advance(now)
        if len(self.active) < self.max_batch:
            self._admit(req, now)
        else:
            self.waiting.append(req)

    def _admit(self, req: SimRequest, now: float) -> None:
        req.admit_s = now
        self.mean_output_tokens += (req.output_tokens - self.mean_output_tokens) / 64
        req.target = self.tokens + req.output_tokens
        heapq.heappush(self.active, (req.target, req.rid, req))
        req.first_token_s = now + self.step_s()

    def complete(self, now: float) -> list[SimRequest]:
        """Finish every sequence that has produced all its tokens by ``now``; admit waiting ones."""
        self._advance(now)
        done = []
        while self.active and self.active[0][0] <= self.tokens + 1e-6:
            _, _, req = heapq.heappop(self.active)
            req.done_s = now
            done.append(req)
        while self.waiting and len(self.active) < self.max_batch:
            self._admit(self.waiting.popleft(), now)
        return done

    def next_completion_s(self) -> float:
        """When the next sequence in the batch finishes (inf when idle)."""
        if not self.active:
            return float("inf")
        return self.updated_s + (self.active[0][0] - self.tokens) * self.step_s()
