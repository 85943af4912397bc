"""A decode instance's reservations: a batch slot, receiver bytes and pinned prefix blocks per request, under a lease.

``ReservationBook`` owns them: it checks and admits a ``DecodeJob`` (or refuses it with a typed
error), lets a transfer in only into its reservation, renews and expires leases from the
transfer's progress, and frees everything when the request ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from opentelemetry.context import Context

from libs.common import subjects
from libs.common.errors import BadRequest, NoCapacity, TransferFailed
from libs.common.messages import DecodeJob, KvManifest
from libs.common.state_parts import PartSpec
from libs.engine.backends import Backend, checked_prompt
from libs.kvwire import KvReceiver
from services.decode_gateway.config import DecodeGatewayConfig
from services.decode_gateway.metrics import DecodeGatewayMetrics

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
    begun_at: float | None = (
        None  # the transfer was first seen at the receiver (by the watcher; its own reading once complete)
    )
    complete_at: float | None = None
    received_bytes: int = 0
    gap_lease_s: float = 0.0  # once begun: the sender's predicted longest gap between its parts, times the margin
    expired_lease_s: float = 0.0  # the no-progress limit that ran out inside the begun transfer (0: none did)
    generated: int = 0
    cancel_reason: str = ""

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


class ReservationBook:
    """Every reservation of one decode instance, by request id, and the capacity they hold."""

    def __init__(
        self,
        backend: Backend,
        receiver: KvReceiver,
        max_batch: int,
        config: DecodeGatewayConfig,
        metrics: DecodeGatewayMetrics,
    ) -> None:
        self.backend = backend
        self.receiver = receiver
        self.max_batch = max_batch
        self.config = config
        self.metrics = metrics
        self._by_request: dict[str, Reservation] = {}

    def __len__(self) -> int:
        return len(self._by_request)

    def __iter__(self) -> Iterator[Reservation]:
        return iter(list(self._by_request.values()))

    def get(self, request_id: str) -> Reservation | None:
        """The reservation of a request, or None."""
        return self._by_request.get(request_id)

    def free_slots(self) -> int:
        """Batch slots a new request could reserve."""
        return max(0, self.max_batch - len(self._by_request))

    def free_kv_bytes(self) -> int:
        """Receiver bytes neither held by transfers nor reserved for ones not begun."""
        arena = self.receiver.arena
        return max(
            0, arena.capacity_bytes - arena.used_bytes - sum(r.pending_bytes() for r in self._by_request.values())
        )

    def receiving(self) -> int:
        """Reservations still waiting for (or receiving) their KV."""
        return sum(1 for r in self._by_request.values() if r.receiving)

    async def reserve(self, job: DecodeJob, *, draining: bool) -> tuple[Reservation, bool]:
        """Hold a slot, receiver bytes and the prompt's cached prefix for ``job`` (and whether it is new), or refuse."""
        existing = self._by_request.get(job.request_id)
        if existing is not None:
            if existing.job.transfer_id != job.transfer_id:
                raise BadRequest(
                    f"request {job.request_id} is already reserved for transfer {existing.job.transfer_id}"
                )
            return existing, False  # a resent job gets the same reservation
        self._validate(job)
        backend, cfg = self.backend, self.config
        tokens, hashes = await checked_prompt(backend, job.prompt_tokens)
        if draining:
            raise NoCapacity("the decode instance is draining")
        if self.free_slots() == 0:
            raise NoCapacity(f"all {self.max_batch} decode slots are reserved or decoding")
        n, bs = len(tokens), backend.block_size
        held = min(backend.cache.leading_blocks("attn_kv", hashes), (n - 1) // bs)
        need = transfer_bytes_bound(backend.plan_parts(n, held))
        if need > cfg.max_transfer_bytes:
            raise NoCapacity(
                f"the transfer may need {need} bytes, over the per-transfer limit {cfg.max_transfer_bytes}"
            )
        free = self.free_kv_bytes()
        if need > free:
            raise NoCapacity(f"the transfer may need {need} bytes; {free} of {cfg.kv_memory_bytes} are free")
        now = time.monotonic()
        res = Reservation(
            job=job,
            tokens=tokens,
            held_hashes=hashes[:held],
            reserved_bytes=need,
            lease_s=job.lease_s or cfg.lease_s,
            deadline=now + job.timeout_s,
            trace_context=trace.set_span_in_context(trace.get_current_span()),
            reserved_at=now,
        )
        backend.cache.pin("attn_kv", res.held_hashes)
        self._by_request[job.request_id] = res
        self._gauges()
        return res, True

    def _validate(self, job: DecodeJob) -> None:
        """``BadRequest`` for a job this instance can never serve."""
        try:
            subjects.token(job.transfer_id, "transfer id")
            subjects.token(job.prefill_site, "prefill site")
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if not job.request_id or not job.reply_subject:
            raise BadRequest("a decode job needs a request_id and a reply_subject")
        if job.model != self.backend.model_name:
            raise BadRequest(f"unknown model {job.model!r}: this instance serves {self.backend.model_name!r}")
        if job.transport not in self.config.transports:
            raise BadRequest(
                f"transport {job.transport!r} is not served here (have {', '.join(self.config.transports)})"
            )
        if job.max_tokens < 1 or job.timeout_s <= 0 or job.lease_s < 0:
            raise BadRequest(
                f"max_tokens must be >= 1, timeout_s > 0 and lease_s >= 0, got "
                f"{job.max_tokens}, {job.timeout_s}, {job.lease_s}"
            )

    def release(self, res: Reservation) -> None:
        """Free an ended request's slot, reserved bytes and pinned blocks."""
        if self._by_request.get(res.job.request_id) is res:
            del self._by_request[res.job.request_id]
            self.backend.cache.unpin("attn_kv", res.held_hashes)
        self._gauges()

    def admit(self, manifest: KvManifest, bytes_needed: int) -> None:
        """Let a transfer in only into its reservation: same ids, held prefix and prompt length, within its bytes.

        Called by the receiver (possibly in a transport thread) before the transfer takes memory; a
        refusal reaches the sender as a typed error, so nobody fills the arena without a reservation.
        """
        res = self._by_request.get(manifest.request_id)
        if res is None or res.job.transfer_id != manifest.transfer_id or not res.receiving:
            raise BadRequest(f"transfer {manifest.transfer_id} has no reservation on {self.config.instance}")
        if list(manifest.skipped_block_hashes) != res.held_hashes:
            raise BadRequest(
                f"transfer {manifest.transfer_id} skips {len(manifest.skipped_block_hashes)} blocks; "
                f"the reservation holds {res.held_blocks} others"
            )
        if manifest.num_tokens != len(res.job.prompt_tokens):
            raise BadRequest(
                f"transfer {manifest.transfer_id} has {manifest.num_tokens} tokens, "
                f"the job {len(res.job.prompt_tokens)}"
            )
        if bytes_needed > res.reserved_bytes:
            raise NoCapacity(
                f"transfer {manifest.transfer_id} needs {bytes_needed} bytes, "
                f"over its reservation of {res.reserved_bytes}"
            )

    def expire_stalled(self, now: float) -> list[tuple[Reservation, str]]:
        """Renew leases from transfer progress; the reservations whose KV stopped coming, with why.

        Until the transfer begins the job's lease applies (the predicted wait for the prefill to start);
        then the sender's manifest says how long it expects to compute between two of its parts (its
        slowest layer of this prompt), and the lease covers that times ``lease_margin``.
        """
        expired = []
        for res in list(self._by_request.values()):
            if not res.receiving:
                continue
            try:
                assembly = self.receiver.assembly(res.job.transfer_id)
            except TransferFailed:  # not begun yet, or over (its waiter learns why)
                pass
            else:
                first_seen = res.begun_at is None
                res.observe(assembly.received_bytes, now)
                if first_seen:
                    res.gap_lease_s = self.config.lease_margin * assembly.manifest.kv_gap_s
                    self._gauges()
            if res.lease_expired(now):
                self.metrics.leases_expired.inc()
                expired.append((res, res.expire()))
        return expired

    def expected_wait_s(self) -> float:
        """0 with a free slot; else until the request closest to its token limit would end at its pace."""
        if self.free_slots():
            return 0.0
        now, waits = time.monotonic(), []
        for res in self._by_request.values():
            if res.generated and res.complete_at is not None:
                per_token = (now - res.complete_at) / res.generated
                waits.append(max(0, res.job.max_tokens - res.generated) * per_token)
        return min(waits, default=0.0)

    def _gauges(self) -> None:
        self.metrics.reservations.set(len(self._by_request))
        self.metrics.reserved_bytes.set(sum(r.pending_bytes() for r in self._by_request.values()))
