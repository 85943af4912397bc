"""JetStream, decode side: the destination site's KV stream, a control endpoint, pull consumers.

The receiver creates its site's stream through its own (destination-site) connection, so the
stream lives where the KV is consumed. Senders ``begin`` a transfer by request/reply on the
instance's control subject (memory is reserved there, or the transfer is refused); the receiver
then reads the transfer's subject with a pull consumer, keeping two pull requests outstanding so
the stream never waits for the next request. Consumed messages are purged as it goes, and a
finished or aborted transfer's messages and consumer are removed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from dataclasses import dataclass
from typing import Literal

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api
from prometheus_client import Counter

from libs.common import subjects
from libs.common.bus import ensure_stream
from libs.common.errors import BadRequest, PrfaasError, TransferFailed
from libs.common.handling import answer, decoded, guarded, own_bad_messages
from libs.common.messages import (
    KvAbort,
    KvBegin,
    KvResumeState,
    KvStatusRequest,
    kv_chunk_decoder,
    kv_control_request_decoder,
    kv_end_decoder,
)
from libs.kvwire.receiver import KvReceiver

log = logging.getLogger(__name__)

CHUNK_HEADER = "Kv-Chunk"  # NATS header carrying a chunk's msgpack KvChunk (base64)


@dataclass(frozen=True)
class JetStreamReceiverConfig:
    """Stream settings and pull sizing of the decode side."""

    # The stream is a delivery buffer, not the record: the sender keeps every part until the
    # receiver verified it, so memory storage (a third cheaper than file here) loses nothing.
    storage: Literal["file", "memory"] = "memory"
    placement_cluster: str = ""  # "": the cluster this connection's server belongs to
    max_stream_bytes: int = 512 << 20  # full: publishes are refused and retried (back-pressure)
    duplicate_window_s: float = 120.0
    # a message nobody reads (garbage on a transfer subject no consumer filters, an abandoned transfer's) leaves
    # the stream after this, so it cannot fill it; every transfer ends (its timeout) well before
    max_message_age_s: float = 600.0
    pull_batch: int = 8  # messages per pull request (two requests outstanding)
    pull_max_bytes: int = 16 << 20  # bytes per pull request (well under the server's 64 MB client buffer)
    pull_expires_s: float = 5.0
    trim_bytes: int = 16 << 20  # purge consumed messages from the stream after this many bytes
    setup_timeout_s: float = 15.0
    api_timeout_s: float = 5.0
    max_status_wait_s: float = 5.0  # a status long-poll asking longer waits this long (it holds the control subject)


class JetStreamReceiver:
    """Feeds a ``KvReceiver`` from the site's KV stream and answers the instance's control subject."""

    def __init__(
        self,
        nc: NatsClient,
        receiver: KvReceiver,
        site: str,
        instance: str,
        config: JetStreamReceiverConfig | None = None,
        bad_messages: Counter | None = None,
    ) -> None:
        self.nc = nc
        self.receiver = receiver
        self.site = site
        self.instance = instance
        self.config = config or JetStreamReceiverConfig()
        self.js = nc.jetstream(timeout=self.config.api_timeout_s)
        self.stream = subjects.kv_transfer_stream(site)
        self._control: Subscription | None = None
        self._pulls: dict[str, asyncio.Task[None]] = {}
        self._progress: dict[str, asyncio.Event] = {}  # pulsed when an end marker was processed
        self._end_round: dict[str, int] = {}
        # counted under {subject="kv_control"}: the gateway's counter once it passes it, else the receiver's own
        self.bad_messages = bad_messages or own_bad_messages("prfaas_kv_control_bad_messages", "subject")

    async def start(self) -> None:
        """Ensure the stream at this site and serve the control subject."""
        cfg = self.config
        placement = api.Placement(cluster=cfg.placement_cluster) if cfg.placement_cluster else None
        await ensure_stream(
            self.js,
            api.StreamConfig(
                name=self.stream,
                subjects=[subjects.kv_transfer_all(self.site)],
                storage=api.StorageType.FILE if cfg.storage == "file" else api.StorageType.MEMORY,
                retention=api.RetentionPolicy.LIMITS,
                discard=api.DiscardPolicy.NEW,
                max_bytes=cfg.max_stream_bytes,
                duplicate_window=cfg.duplicate_window_s,
                max_age=cfg.max_message_age_s,
                placement=placement,
            ),
            deadline_s=cfg.setup_timeout_s,
        )
        self._control = await self.nc.subscribe(
            subjects.kv_control(self.site, self.instance), cb=guarded(self._on_control)
        )

    async def stop(self) -> None:
        """Stop serving and pulling (idempotent); transfers stay in the receiver."""
        control, self._control = self._control, None
        if control is not None:
            with contextlib.suppress(nats.errors.Error):
                await control.unsubscribe()
        tasks = list(self._pulls.values())
        self._pulls.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> JetStreamReceiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- control ----------------------------------------------------------------------------

    async def _on_control(self, msg: Msg) -> None:
        async def handle() -> KvResumeState:
            request = decoded(kv_control_request_decoder, msg, "kv_control", self.bad_messages)
            return await self._handle(request)

        await answer(msg, handle)

    async def _handle(self, request: KvBegin | KvStatusRequest | KvAbort) -> KvResumeState:
        if isinstance(request, KvBegin):
            tid = request.manifest.transfer_id
            if request.manifest.chunk_bytes > self.config.pull_max_bytes:
                raise BadRequest(
                    f"chunk_bytes {request.manifest.chunk_bytes} over the pull size {self.config.pull_max_bytes}"
                )
            state = self.receiver.begin(request.manifest)
            if not state.complete and tid not in self._pulls:
                try:
                    await self._create_consumer(tid)
                except TransferFailed as e:
                    self.receiver.abort(tid, e.message)  # free the memory just reserved
                    raise
                self._progress[tid] = asyncio.Event()
                self._end_round.setdefault(tid, -1)
                self._pulls[tid] = asyncio.create_task(self._pull(tid), name=f"kv-pull-{tid}")
            return self._state(tid)
        if isinstance(request, KvStatusRequest):
            return await self._status(request)
        self.receiver.abort(request.transfer_id, request.reason or "aborted by sender")
        await self._finish(request.transfer_id)
        return KvResumeState(transfer_id=request.transfer_id, complete=False)

    def _state(self, tid: str) -> KvResumeState:
        state = self.receiver.status(tid)
        return msgspec.structs.replace(state, end_round=self._end_round.get(tid, -1))

    async def _status(self, request: KvStatusRequest) -> KvResumeState:
        """Answer once the transfer is complete or end ``round`` was processed, or after ``wait_s``."""
        tid = request.transfer_id
        event = self._progress.get(tid)
        if event is not None and request.wait_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(request.wait_s, self.config.max_status_wait_s)):
                    while not self.receiver.status(tid).complete and self._end_round.get(tid, -1) < request.round:
                        event.clear()
                        await event.wait()
        return self._state(tid)

    # --- pulling ----------------------------------------------------------------------------

    def _consumer(self, tid: str) -> str:
        return f"kv-{tid}"

    async def _create_consumer(self, tid: str) -> None:
        config = api.ConsumerConfig(
            durable_name=self._consumer(tid),
            filter_subject=subjects.kv_transfer(self.site, self.instance, tid),
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=self.receiver.config.transfer_timeout_s,
            mem_storage=True,
        )
        try:
            await self.js.add_consumer(self.stream, config=config)
        except (nats.errors.Error, nats.js.errors.Error) as e:
            raise TransferFailed(f"cannot create consumer for {tid}: {e!r}") from e

    async def _pull(self, tid: str) -> None:
        """Read the transfer's messages until it completes or is aborted."""
        cfg = self.config
        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, pending_bytes_limit=4 * cfg.pull_max_bytes + (8 << 20))
        request = json.dumps(
            {"batch": cfg.pull_batch, "max_bytes": cfg.pull_max_bytes, "expires": int(cfg.pull_expires_s * 1e9)}
        ).encode()
        next_subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self.stream}.{self._consumer(tid)}"
        outstanding = 0
        consumed_bytes = 0
        try:
            while True:
                while outstanding <= cfg.pull_batch:
                    await self.nc.publish(next_subject, request, reply=inbox)
                    outstanding += cfg.pull_batch
                try:
                    msg = await sub.next_msg(timeout=cfg.pull_expires_s * 2)
                except nats.errors.TimeoutError:
                    outstanding = 0  # requests expired unseen: ask again
                    continue
                status = msg.headers.get("Status") if msg.headers else None
                if status is not None:
                    if status in ("408", "409") and "Nats-Pending-Messages" in msg.headers:
                        outstanding -= int(msg.headers["Nats-Pending-Messages"])
                    elif status != "100":
                        log.warning(
                            "pull status",
                            extra={
                                "transfer_id": tid,
                                "status": status,
                                "description": msg.headers.get("Description", ""),
                            },
                        )
                        outstanding = 0
                    continue
                outstanding -= 1
                if await self._on_message(tid, msg):
                    return
                consumed_bytes += len(msg.data)
                if consumed_bytes >= cfg.trim_bytes:
                    consumed_bytes = 0
                    await self._trim(tid, msg)
        except TransferFailed as e:
            log.info("transfer pull stopped", extra={"transfer_id": tid, "reason": e.message})
        except (PrfaasError, msgspec.DecodeError, ValueError) as e:
            log.warning("bad message in a transfer stream", extra={"transfer_id": tid, "error": repr(e)})
            self.receiver.abort(tid, f"bad message in the stream: {e}")
        except nats.errors.Error as e:  # the connection failed: a resuming sender's begin pulls again
            log.warning("transfer pull interrupted", extra={"transfer_id": tid, "error": repr(e)})
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            if self._pulls.get(tid) is asyncio.current_task():
                del self._pulls[tid]
                await self._finish(tid)

    async def _on_message(self, tid: str, msg: Msg) -> bool:
        """Apply one stream message; True once the transfer is complete."""
        encoded = msg.headers.get(CHUNK_HEADER) if msg.headers else None
        if encoded is None:
            end = kv_end_decoder.decode(msg.data)
            try:
                state = await asyncio.to_thread(self.receiver.end, end)  # verifies and decodes: CPU-bound
            finally:
                self._end_round[tid] = max(self._end_round.get(tid, -1), end.round)
                self._pulse(tid)
            return state.complete
        header = kv_chunk_decoder.decode(base64.b64decode(encoded))
        assembly = self.receiver.assembly(tid)
        target = assembly.target(header)
        if not isinstance(target, bool):
            payload = memoryview(msg.data)
            if len(payload) != header.length:
                assembly.abandon(header)
                return False
            target[:] = payload  # one chunk: a copy and a checksum, well under a millisecond
            assembly.commit(header, target)
        return False

    async def _trim(self, tid: str, msg: Msg) -> None:
        """Purge the transfer's messages up to ``msg`` (consumed): the stream holds only what is in flight."""
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self.js.purge_stream(
                self.stream,
                subject=subjects.kv_transfer(self.site, self.instance, tid),
                seq=msg.metadata.sequence.stream + 1,
            )

    def _pulse(self, tid: str) -> None:
        event = self._progress.get(tid)
        if event is not None:
            event.set()

    async def _finish(self, tid: str) -> None:
        """Remove a finished or aborted transfer's messages and consumer."""
        task = self._pulls.pop(tid, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pulse(tid)
        self._progress.pop(tid, None)
        self._end_round.pop(tid, None)
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self.js.delete_consumer(self.stream, self._consumer(tid))
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await self.js.purge_stream(self.stream, subject=subjects.kv_transfer(self.site, self.instance, tid))
