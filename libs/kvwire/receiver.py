"""The decode side's transfer registry: memory limits, begin/resume, end, abort, deadlines, hand-over.

Transports (``TcpReceiverServer``, ``JetStreamReceiver``) feed one ``KvReceiver``; the decode
gateway awaits ``wait(transfer_id)`` and gets the restored parts once every part is verified,
then releases them. Methods other than ``start``/``stop``/``wait`` may be called from transport
threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from libs.common.errors import BadRequest, NoCapacity, PrfaasError, TransferFailed, UpstreamTimeout
from libs.common.messages import KvEnd, KvManifest, KvResumeState
from libs.common.state_parts import StatePart
from libs.kvwire.arena import Arena
from libs.kvwire.assembly import TransferAssembly, required_bytes
from libs.kvwire.format import validate_manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceiverConfig:
    """Memory limits and deadlines of a decode-side receiver."""

    max_total_bytes: int = 2 << 30  # the arena: all transfers in progress or not yet released
    max_transfer_bytes: int = 1 << 30
    transfer_timeout_s: float = 120.0  # from begin to complete; then aborted and freed
    claim_timeout_s: float = 60.0  # a complete transfer nobody waits for is freed after this
    prefault: bool = False  # touch the arena's pages at start (no page faults while receiving)
    remember_ids: int = 4096  # finished and aborted ids remembered (late or resent frames)
    reap_interval_s: float = 0.5


class ReceivedTransfer:
    """A complete, verified transfer; its arrays live in receiver memory until ``release()``."""

    def __init__(
        self, manifest: KvManifest, parts: list[StatePart], release, *, began_at: float, completed_at: float
    ) -> None:
        self.manifest = manifest
        self.parts = parts
        self.began_at = began_at  # time.monotonic() when the manifest arrived (the transfer's first bytes)
        self.completed_at = completed_at  # time.monotonic() when the last part verified
        self._release = release

    def release(self) -> None:
        """Give the memory back (idempotent); the parts' arrays must not be used afterwards."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> ReceivedTransfer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class ReceiverTotals:
    """Counters over every transfer this receiver has closed (completed and released, or aborted)."""

    transfers_completed: int = 0
    transfers_aborted: int = 0
    transfers_refused: int = 0
    received_bytes: int = 0
    duplicate_chunks: int = 0  # chunks received again although verified (a resend of held data)
    bad_chunks: int = 0  # chunks whose checksum did not match (asked again)


@dataclass
class _Entry:
    assembly: TransferAssembly
    started: float
    completed: float | None = None
    claimed: bool = False


Admission = Callable[[KvManifest, int], None]


class KvReceiver:
    """Registry of incoming transfers of one decode instance, within a fixed memory arena.

    ``admit(manifest, bytes_needed)``, if given, is asked before a new transfer takes memory; it
    refuses by raising a ``PrfaasError`` (e.g. a transfer nobody reserved, or larger than its
    reservation), which the sender receives as a typed error. It may run in a transport thread.
    """

    def __init__(self, config: ReceiverConfig | None = None, admit: Admission | None = None) -> None:
        self.config = config or ReceiverConfig()
        self._admit = admit
        self.arena = Arena(self.config.max_total_bytes)
        self._lock = threading.Lock()
        self._active: dict[str, _Entry] = {}
        self._finished: OrderedDict[str, str] = OrderedDict()  # id -> "" (complete) or abort reason
        self._waiters: dict[str, asyncio.Future[ReceivedTransfer]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reaper: asyncio.Task[None] | None = None
        self.totals = ReceiverTotals()

    @property
    def used_bytes(self) -> int:
        """Arena bytes held by transfers (in progress, or complete and not yet released)."""
        return self.arena.used_bytes

    @property
    def active_transfers(self) -> int:
        """Transfers holding memory."""
        with self._lock:
            return len(self._active)

    async def start(self) -> None:
        """Prefault the arena if configured and start the deadline reaper."""
        self._loop = asyncio.get_running_loop()
        if self.config.prefault:
            await asyncio.to_thread(self.arena.prefault)
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_loop(), name="kv-receiver-reaper")

    async def stop(self) -> None:
        """Abort every transfer and stop the reaper (idempotent)."""
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        with self._lock:
            ids = list(self._active)
        for tid in ids:
            self.abort(tid, "receiver stopped")

    async def __aenter__(self) -> KvReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def begin(self, manifest: KvManifest) -> KvResumeState:
        """Open a transfer (or report what is held when it is resumed); refuses with a typed error."""
        validate_manifest(manifest)
        tid = manifest.transfer_id
        with self._lock:
            entry = self._active.get(tid)
            if entry is not None:
                if entry.assembly.manifest != manifest:
                    raise BadRequest(f"transfer {tid} was begun with a different manifest")
                return self._state(tid, entry.assembly)
            if tid in self._finished:
                return self._finished_state(tid)
            need = required_bytes(manifest)
            if self._admit is not None:
                try:
                    self._admit(manifest, need)
                except PrfaasError:
                    self.totals.transfers_refused += 1
                    raise
            if need > self.config.max_transfer_bytes:
                self.totals.transfers_refused += 1
                raise NoCapacity(
                    f"transfer {tid} needs {need} bytes, over the per-transfer limit {self.config.max_transfer_bytes}"
                )
            region = self.arena.allocate(need)
            if region is None:
                self.totals.transfers_refused += 1
                raise NoCapacity(
                    f"transfer {tid} needs {need} bytes; receiver holds {self.arena.used_bytes} of "
                    f"{self.arena.capacity_bytes} (largest free {self.arena.largest_free_bytes})"
                )
            assembly = TransferAssembly(manifest, self.arena, region, lambda: self.arena.free(region))
            self._active[tid] = _Entry(assembly, time.monotonic())
        log.info("transfer begun", extra={"transfer_id": tid, "bytes": need, "parts": len(manifest.parts)})
        return KvResumeState(transfer_id=tid, complete=False)

    def assembly(self, transfer_id: str) -> TransferAssembly:
        """The transfer in progress (``TransferFailed`` if it was aborted, finished or never begun)."""
        with self._lock:
            entry = self._active.get(transfer_id)
            if entry is not None:
                return entry.assembly
            reason = self._finished.get(transfer_id)
        if reason is None:
            raise TransferFailed(f"transfer {transfer_id} was not begun")
        raise TransferFailed(f"transfer {transfer_id} is over: {reason or 'complete'}")

    def status(self, transfer_id: str) -> KvResumeState:
        """What the receiver holds of a transfer."""
        with self._lock:
            entry = self._active.get(transfer_id)
            if entry is not None:
                return self._state(transfer_id, entry.assembly)
            if transfer_id in self._finished:
                return self._finished_state(transfer_id)
        raise TransferFailed(f"transfer {transfer_id} was not begun")

    def end(self, end: KvEnd) -> KvResumeState:
        """Process an end marker: complete the transfer if every part verifies; else report what is held."""
        assembly = self.assembly(end.transfer_id)
        try:
            done = assembly.finish(end.digests)
        except TransferFailed as e:
            self.abort(end.transfer_id, e.message)
            raise
        if done:
            self._completed(end.transfer_id)
        return self.status(end.transfer_id)

    def abort(self, transfer_id: str, reason: str) -> None:
        """Drop a transfer and free its memory; waiters get ``TransferFailed`` (idempotent)."""
        with self._lock:
            entry = self._active.pop(transfer_id, None)
            if entry is None and transfer_id in self._finished:
                return
            self._remember(transfer_id, reason or "aborted")
            if entry is not None:
                self._count(entry.assembly, completed=False)
        if entry is not None:
            entry.assembly.close()
            log.info("transfer aborted", extra={"transfer_id": transfer_id, "reason": reason})
        self._notify(transfer_id)

    async def wait(self, transfer_id: str, timeout_s: float) -> ReceivedTransfer:
        """The verified parts of a transfer (begun already or not); ``UpstreamTimeout`` after ``timeout_s``."""
        if transfer_id in self._waiters:
            raise BadRequest(f"transfer {transfer_id} already has a waiter")
        future = self._waiters[transfer_id] = asyncio.get_running_loop().create_future()
        self._settle(transfer_id)
        handed = False
        try:
            async with asyncio.timeout(timeout_s):
                result = await future
            handed = True
            return result
        except TimeoutError as e:
            raise UpstreamTimeout(f"transfer {transfer_id} not complete after {timeout_s:.1f}s") from e
        finally:
            del self._waiters[transfer_id]
            # Timed out or cancelled just as the result arrived: nobody else will release it.
            if not handed and future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()

    # --- internals ------------------------------------------------------------------------

    def _state(self, tid: str, assembly: TransferAssembly) -> KvResumeState:
        return KvResumeState(transfer_id=tid, complete=assembly.complete, held=assembly.held())

    def _finished_state(self, tid: str) -> KvResumeState:
        reason = self._finished[tid]
        if reason:
            raise TransferFailed(f"transfer {tid} was aborted: {reason}")
        return KvResumeState(transfer_id=tid, complete=True)

    def _remember(self, tid: str, reason: str) -> None:
        self._finished[tid] = reason
        self._finished.move_to_end(tid)
        while len(self._finished) > self.config.remember_ids:
            self._finished.popitem(last=False)

    def _count(self, assembly: TransferAssembly, completed: bool) -> None:
        """Fold a closing transfer's counters into the totals (under the lock)."""
        totals = self.totals
        if completed:
            totals.transfers_completed += 1
        else:
            totals.transfers_aborted += 1
        totals.received_bytes += assembly.received_bytes
        totals.duplicate_chunks += assembly.duplicate_chunks
        totals.bad_chunks += assembly.bad_chunks

    def _completed(self, tid: str) -> None:
        with self._lock:
            entry = self._active.get(tid)
            if entry is None or entry.completed is not None:
                return
            entry.completed = time.monotonic()
        log.info("transfer complete", extra={"transfer_id": tid, "bytes": entry.assembly.received_bytes})
        self._notify(tid)

    def _notify(self, tid: str) -> None:
        """Settle a waiter of ``tid`` on the event loop (callable from any thread)."""
        if self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._settle(tid)
        else:
            with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
                self._loop.call_soon_threadsafe(self._settle, tid)

    def _settle(self, tid: str) -> None:
        """On the loop: hand a complete transfer to its waiter, or fail the waiter if it was aborted."""
        future = self._waiters.get(tid)
        if future is None or future.done():
            return
        with self._lock:
            entry = self._active.get(tid)
            if entry is not None and entry.completed is not None and not entry.claimed:
                entry.claimed = True
                assembly = entry.assembly
                future.set_result(
                    ReceivedTransfer(
                        assembly.manifest,
                        assembly.parts(),
                        lambda: self._release(tid),
                        began_at=entry.started,
                        completed_at=entry.completed,
                    )
                )
                return
            reason = self._finished.get(tid)
        if reason:
            future.set_exception(TransferFailed(f"transfer {tid} was aborted: {reason}"))

    def _release(self, tid: str) -> None:
        with self._lock:
            entry = self._active.pop(tid, None)
            if entry is not None:
                self._remember(tid, "")
                self._count(entry.assembly, completed=True)
        if entry is not None:
            entry.assembly.close()

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.reap_interval_s)
            now = time.monotonic()
            with self._lock:
                late = [
                    (tid, f"deadline: not complete after {self.config.transfer_timeout_s:.1f}s")
                    for tid, e in self._active.items()
                    if e.completed is None and now - e.started > self.config.transfer_timeout_s
                ] + [
                    (tid, f"complete but never claimed within {self.config.claim_timeout_s:.1f}s")
                    for tid, e in self._active.items()
                    if e.completed is not None and not e.claimed and now - e.completed > self.config.claim_timeout_s
                ]
            for tid, reason in late:
                self.abort(tid, reason)
