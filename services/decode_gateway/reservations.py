"""A decode instance's reservations: a batch slot, receiver bytes and pinned prefix blocks under a lease."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from opentelemetry.context import Context

from libs.common.messages import DecodeJob
from libs.common.state_parts import PartSpec

_SLACK_BYTES = 64  # the receiver aligns every buffer to 64 bytes


def transfer_bytes_bound(specs: Sequence[PartSpec]) -> int:
    """Receiver bytes a transfer of ``specs`` may take, whatever codec its ``attn_kv`` parts use.

    Each part needs its array; an encoded part also needs a wire buffer (at most zstd's compress
    bound, ``n + n/256`` plus a header; int8 is smaller), and ``attn_kv`` parts may be encoded.
    """
    total = 0
    for spec in specs:
        total += spec.nbytes + _SLACK_BYTES
        if spec.kind == "attn_kv":
            total += spec.nbytes + spec.nbytes // 256 + 1024 + _SLACK_BYTES
    return total


@dataclass(eq=False)
class Reservation:
    """One request from its reservation to its last token."""

    job: DecodeJob
    tokens: np.ndarray  # the prompt, checked
    held_hashes: list[int]  # pinned leading attn_kv blocks (not sent)
    reserved_bytes: int
    lease_s: float  # the job's: how long to wait for the transfer to begin, and the least wait between its bytes
    deadline: float  # monotonic
    trace_context: Context
    reserved_at: float = field(default_factory=time.monotonic)
    progress_at: float = 0.0
    begun_at: float | None = None  # the transfer was first seen at the receiver (by the watcher; its own reading once complete)
    complete_at: float | None = None
    received_bytes: int = 0
    gap_lease_s: float = 0.0  # once begun: the sender's predicted longest gap between its parts, times the margin
    expired_lease_s: float = 0.0  # the no-progress limit that ran out inside the begun transfer (0: none did)
    generated: int = 0
    cancel_reason: str = ""
    task: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self.progress_at = self.reserved_at

    @property
    def held_blocks(self) -> int:
        """Leading blocks of the prompt the instance holds."""
        return len(self.held_hashes)

    @property
    def receiving(self) -> bool:
        """Still waiting for its KV (reserved or receiving)."""
        return self.complete_at is None

    def pending_bytes(self) -> int:
        """Bytes counted against the receiver while the transfer has not begun (then the receiver counts them)."""
        return self.reserved_bytes if self.begun_at is None and self.receiving else 0

    def observe(self, received_bytes: int, now: float) -> None:
        """Record the transfer's received bytes; growth (or its begin) renews the lease."""
        if self.begun_at is None:
            self.begun_at = now
            self.progress_at = now
        if received_bytes > self.received_bytes:
            self.received_bytes = received_bytes
            self.progress_at = now

    @property
    def lease_limit_s(self) -> float:
        """The no-progress limit now: ``lease_s``, or the sender's predicted gap with its margin once begun if longer."""
        return self.lease_s if self.begun_at is None else max(self.lease_s, self.gap_lease_s)

    def lease_expired(self, now: float) -> bool:
        """True when the KV has made no progress (or not begun) for its limit."""
        return self.receiving and now - self.progress_at > self.lease_limit_s

    def expire(self) -> str:
        """Why the lease ran out; one inside the transfer is kept in ``expired_lease_s`` (the prompt's layer was slower)."""
        limit = self.lease_limit_s
        if self.begun_at is None:
            return f"lease expired: no KV progress for {limit:.2f}s (the transfer had not begun)"
        self.expired_lease_s = limit
        return f"lease expired: no KV progress for {limit:.2f}s inside the transfer"
