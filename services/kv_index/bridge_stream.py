"""One bridged engine's batches in the KV event stream, numbered on from the last one it holds.

A bridge (re)starts its numbering after the later of the instance's last batch in the stream and
the last batch the store applied (the stream may have aged out what the store remembers), so a
restarted index never has its new batches taken for duplicates. Large event lists are split
into several consecutive batches, each under the NATS payload limit; a publish is retried under
the same message id until the stream acknowledges it, so a retry never stores a batch twice.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from libs.common import subjects
from libs.common.messages import (
    MAX_BATCH_EVENTS,
    BlocksEvicted,
    BlocksStored,
    KvEvent,
    KvEventBatch,
    encode,
    kv_event_batch_decoder,
)

log = logging.getLogger(__name__)

MAX_HASHES_PER_BATCH = 4096  # ~37 KB of msgpack; Redis applies it in ~10 ms, so lookups are never held up long


def split_events(events: list[KvEvent], max_hashes: int = MAX_HASHES_PER_BATCH) -> list[list[KvEvent]]:
    """The events cut into consecutive lists of at most ``max_hashes`` block hashes and ``MAX_BATCH_EVENTS`` events."""
    chunks: list[list[KvEvent]] = [[]]
    room = max_hashes
    for event in events:
        if isinstance(event, BlocksStored | BlocksEvicted):
            hashes = event.block_hashes
            while hashes:
                if room == 0 or len(chunks[-1]) >= MAX_BATCH_EVENTS:
                    chunks.append([])
                    room = max_hashes
                piece, hashes = hashes[:room], hashes[room:]
                chunks[-1].append(msgspec.structs.replace(event, block_hashes=piece))
                room -= len(piece)
        else:
            if len(chunks[-1]) >= MAX_BATCH_EVENTS:
                chunks.append([])
                room = max_hashes
            chunks[-1].append(event)
    return chunks


class BridgeStream:
    """Publishes one engine instance's event batches, numbered per instance."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        site: str,
        instance: str,
        *,
        timeout_s: float,
        retry_backoff_max_s: float,
        applied_seq: Callable[[], Awaitable[int]],
    ) -> None:
        self.js = js
        self.stream = stream
        self.site = site
        self.instance = instance
        self.subject = subjects.kv_events(site, instance)
        self.timeout_s = timeout_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.applied_seq = applied_seq
        self.next_seq = 1
        self._life = ""

    async def resume(self) -> None:
        """Number the next batch after the last one in the stream or applied, whichever is later."""
        in_stream = await self._retrying("read the last batch", self._last_in_stream)
        applied = await self.applied_seq()
        self.next_seq = max(in_stream, applied) + 1
        self._life = secrets.token_hex(4)
        log.info("bridge numbering resumed", extra={"site": self.site, "instance": self.instance, "seq": self.next_seq})

    async def publish(self, events: list[KvEvent]) -> None:
        """Publish the events as one batch or, if large, several consecutive ones."""
        for chunk in split_events(events):
            batch = KvEventBatch(
                site=self.site, instance=self.instance, seq=self.next_seq, ts=time.time(), events=chunk
            )
            headers = {"Nats-Msg-Id": f"zmq/{self.site}/{self.instance}/{self._life}/{batch.seq}"}
            data = encode(batch)

            async def _send(data: bytes = data, headers: dict[str, str] = headers) -> None:
                await self.js.publish(self.subject, data, timeout=self.timeout_s, headers=headers)

            await self._retrying(f"publish batch {batch.seq}", _send)
            self.next_seq += 1

    async def _last_in_stream(self) -> int:
        try:
            raw = await self.js.get_last_msg(self.stream, self.subject)
        except NotFoundError:
            return 0
        try:
            return kv_event_batch_decoder.decode(raw.data).seq
        except msgspec.DecodeError:
            return 0  # not one of ours: the store's last applied batch decides

    async def _retrying(self, what: str, op: Callable[[], Awaitable]):
        """Run ``op`` until it succeeds, backing off while NATS or JetStream do not answer in time."""
        backoff = 0.05
        while True:
            try:
                return await op()
            except (nats.errors.Error, TimeoutError) as e:
                log.warning(
                    "bridge cannot %s yet (%r); retrying", what, e, extra={"site": self.site, "instance": self.instance}
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.retry_backoff_max_s)
