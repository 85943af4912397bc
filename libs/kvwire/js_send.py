"""JetStream, prefill side: publish chunks to the destination site's stream through the supercluster.

A transfer begins by request/reply on the decode instance's control subject (the receiver
reserves memory or refuses). Chunks are then published with a window of outstanding publish acks
(the stream at the destination acknowledges each one: that is the RTT sample), a ``Nats-Msg-Id``
for de-duplication, and the chunk header in a NATS header so the payload is published from its
memoryview as is. After the end marker the sender long-polls the receiver's status and resends
whatever it lacks (a chunk rejected by its checksum, or one whose publish failed).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from libs.common import subjects
from libs.common.errors import BadRequest, TransferFailed, error_from_code
from libs.common.messages import (
    ErrorReply,
    KvAbort,
    KvBegin,
    KvControlRequest,
    KvEnd,
    KvManifest,
    KvResumeState,
    KvStatusRequest,
    encode,
    kv_control_reply_decoder,
)
from libs.kvwire.format import held_map
from libs.kvwire.js_recv import CHUNK_HEADER
from libs.kvwire.link import Link
from libs.kvwire.sender import Destination, MissingChunks, OutChunk, TransportBroken

log = logging.getLogger(__name__)

_OVERHEAD_BYTES = 256  # subject, message id and chunk header of one message, for pacing
_PUBLISH_ERRORS = (nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError)


@dataclass(frozen=True)
class JetStreamConfig:
    """Chunking, ack window and deadlines of JetStream transfers."""

    chunk_bytes: int = 2 << 20  # well under the server's max_payload with headers
    window: int = 16  # publish acks outstanding per transfer
    request_timeout_s: float = 5.0  # one control request
    ready_timeout_s: float = 15.0  # keep retrying begin while the receiver is not reachable yet
    ack_timeout_s: float = 30.0  # no publish ack for this long breaks the session
    status_wait_s: float = 2.0  # long-poll of the receiver's status after the end marker
    max_end_rounds: int = 4
    max_chunk_attempts: int = 8  # publishes refused (stream full, no interest yet) retried with backoff


def message_id(transfer_id: str, part: int, offset: int, attempt: int) -> str:
    """``Nats-Msg-Id`` of one chunk publish: a resend (``attempt`` > 0) is a new message."""
    return f"{transfer_id}.{part}.{offset}.{attempt}"


class JetStreamTransport:
    """Sends transfers to ``JetStreamReceiver``s (a destination's ``site``/``instance``)."""

    def __init__(self, nc: NatsClient, config: JetStreamConfig | None = None) -> None:
        self.nc = nc
        self.config = config or JetStreamConfig()
        self.chunk_bytes = self.config.chunk_bytes
        self.js = nc.jetstream(timeout=self.config.request_timeout_s, publish_async_max_pending=1 << 16)

    async def request(self, dest: Destination, msg: KvControlRequest, timeout_s: float) -> KvResumeState:
        """One control request to ``dest``'s instance (typed error for an ErrorReply)."""
        subject = subjects.kv_control(dest.site, dest.instance)
        try:
            reply = await self.nc.request(subject, encode(msg), timeout=timeout_s)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
            raise TransportBroken(f"no answer on {subject}: {e!r}") from e
        decoded = kv_control_reply_decoder.decode(reply.data)
        if isinstance(decoded, ErrorReply):
            raise error_from_code(decoded.code, decoded.message)
        return decoded

    async def open(self, manifest: KvManifest, dest: Destination, link: Link) -> _JsSession:
        """Begin (or resume) the transfer, retrying while the receiver is not reachable yet."""
        if dest.site != manifest.dst_site:
            raise BadRequest(f"destination site {dest.site} differs from the manifest's {manifest.dst_site}")
        try:
            subjects.token(dest.instance, "instance")
        except ValueError as e:
            raise BadRequest(str(e)) from None
        deadline = time.monotonic() + self.config.ready_timeout_s
        delay = 0.05
        while True:
            try:
                state = await self.request(dest, KvBegin(manifest=manifest), self.config.request_timeout_s)
                return _JsSession(self, manifest, dest, link, state)
            except TransportBroken:
                if time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def abort(self, transfer_id: str, dest: Destination, reason: str) -> None:
        """Tell the receiver to drop ``transfer_id`` and purge its messages."""
        try:
            await self.request(dest, KvAbort(transfer_id=transfer_id, reason=reason), self.config.request_timeout_s)
        except TransportBroken as e:
            raise TransferFailed(f"abort of {transfer_id} not delivered: {e}") from e


class _JsSession:
    """One open attempt of a transfer over JetStream."""

    def __init__(
        self, transport: JetStreamTransport, manifest: KvManifest, dest: Destination, link: Link, state: KvResumeState
    ) -> None:
        self.transport = transport
        self.config = transport.config
        self.manifest = manifest
        self.dest = dest
        self.link = link
        self.subject = subjects.kv_transfer(dest.site, dest.instance, manifest.transfer_id)
        self.held = held_map(state.held)
        self.complete = state.complete
        self.sent_chunks = 0
        self.sent_bytes = 0
        self.resent_chunks = 0
        self.stripes = 1  # the NATS connection
        self._window = asyncio.Semaphore(self.config.window)
        self._pending: set[asyncio.Future] = set()
        self._failed: list[tuple[OutChunk, int]] = []  # publishes not acknowledged: send again
        self._idle = asyncio.Event()
        self._idle.set()
        self._round = 0

    def retransmits(self) -> None:
        """The kernel's counts are the NATS client's, not the transfer's: not told."""
        return None

    async def send(self, chunk: OutChunk) -> None:
        """Publish a chunk once the ack window has room."""
        await self._republish_failed()
        await self._publish(chunk, 0)

    async def _publish(self, chunk: OutChunk, attempt: int) -> None:
        if attempt >= self.config.max_chunk_attempts:
            raise TransferFailed(
                f"chunk {chunk.part}@{chunk.offset} of {self.manifest.transfer_id} failed {attempt} times"
            )
        try:
            with self.link.counters.window_wait(self._window.locked()):
                async with asyncio.timeout(self.config.ack_timeout_s):
                    await self._window.acquire()
        except TimeoutError as e:
            raise TransportBroken(
                f"transfer {self.manifest.transfer_id}: no publish ack for {self.config.ack_timeout_s:.0f}s"
            ) from e
        header = chunk.header(self.manifest.transfer_id, attempt)
        headers = {
            "Nats-Msg-Id": message_id(self.manifest.transfer_id, chunk.part, chunk.offset, attempt),
            CHUNK_HEADER: base64.b64encode(encode(header)).decode(),
        }
        size = len(chunk.payload)
        await self.link.bucket.wait(size + _OVERHEAD_BYTES, self.link.order_of(self.manifest.transfer_id))
        sent_at = time.monotonic()
        try:
            future = await self.transport.js.publish_async(self.subject, chunk.payload, headers=headers)
        except _PUBLISH_ERRORS as e:
            self._window.release()
            raise TransportBroken(f"publish of {self.manifest.transfer_id} failed: {e!r}") from e
        self.sent_chunks += 1
        self.sent_bytes += size
        if attempt:
            self.resent_chunks += 1
            self.link.counters.retransmitted(size)
        self.link.counters.sent(size)
        self._pending.add(future)
        self._idle.clear()
        future.add_done_callback(lambda f: self._acked(f, chunk, attempt, sent_at))

    def _acked(self, future: asyncio.Future, chunk: OutChunk, attempt: int, sent_at: float) -> None:
        self._window.release()
        self._pending.discard(future)
        if not self._pending:
            self._idle.set()
        size = len(chunk.payload)
        if future.cancelled() or future.exception() is not None:
            self.link.counters.lost(size)
            self._failed.append((chunk, attempt + 1))
        else:
            self.link.counters.acked(size, time.monotonic() - sent_at)

    async def _republish_failed(self) -> None:
        while self._failed:
            failed, self._failed = self._failed, []
            # The stream is full, or its interest is still crossing the gateway: back off.
            await asyncio.sleep(0.05 * 2 ** min(max(a for _, a in failed), 6))
            for chunk, attempt in failed:
                await self._publish(chunk, attempt)

    async def _drain(self) -> None:
        """Wait for every outstanding publish ack, resending failed publishes."""
        while True:
            try:
                async with asyncio.timeout(self.config.ack_timeout_s):
                    await self._idle.wait()
            except TimeoutError as e:
                raise TransportBroken(
                    f"transfer {self.manifest.transfer_id}: {len(self._pending)} publish acks "
                    f"missing after {self.config.ack_timeout_s:.0f}s"
                ) from e
            if not self._failed:
                return
            await self._republish_failed()

    async def end(self, digests: list[int], missing: MissingChunks) -> None:
        """Publish the end marker, then long-poll the receiver until it verified every part."""
        if self.complete:
            return
        for _ in range(self.config.max_end_rounds):
            await self._drain()
            self._round += 1
            end = KvEnd(transfer_id=self.manifest.transfer_id, digests=digests, round=self._round)
            try:
                await self.transport.js.publish(
                    self.subject, encode(end), headers={"Nats-Msg-Id": f"{self.manifest.transfer_id}.end.{self._round}"}
                )
            except _PUBLISH_ERRORS as e:
                raise TransportBroken(f"end marker of {self.manifest.transfer_id} not stored: {e!r}") from e
            state = await self._await_round()
            if state.complete:
                self.complete = True
                return
            for chunk in missing(held_map(state.held)):
                await self._publish(chunk, self._round)  # a new message id per round
        raise TransferFailed(
            f"transfer {self.manifest.transfer_id}: incomplete after {self.config.max_end_rounds} end rounds"
        )

    async def _await_round(self) -> KvResumeState:
        """The receiver's state once it processed this round's end marker (or completed)."""
        deadline = time.monotonic() + self.config.ack_timeout_s
        while True:
            wait_s = self.config.status_wait_s
            request = KvStatusRequest(transfer_id=self.manifest.transfer_id, round=self._round, wait_s=wait_s)
            state = await self.transport.request(self.dest, request, wait_s + self.config.request_timeout_s)
            if state.complete or state.end_round >= self._round:
                return state
            if time.monotonic() > deadline:
                raise TransportBroken(
                    f"transfer {self.manifest.transfer_id}: end round {self._round} not "
                    f"processed after {self.config.ack_timeout_s:.0f}s"
                )

    async def close(self) -> None:
        """Forget outstanding acks (idempotent); what the stream stored stays for a resume."""
        for future in list(self._pending):
            future.cancel()
        self._pending.clear()
        self._idle.set()
