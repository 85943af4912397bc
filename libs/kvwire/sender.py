"""The prefill side: stream a transfer's parts as they are produced, resuming after failures.

The manifest (every part's spec) goes first; then each part, as the engine yields it, is encoded
(in a worker thread unless ``raw``) and its chunks handed to the transport, which checksums each
chunk just before it leaves, paced by the site pair's shared bucket. A broken connection reopens the session: the receiver reports what it holds
and only the rest is sent (also after a sender restart with the same manifest). ``send`` returns
once the receiver has verified every part. It never aborts by itself: a transfer left unfinished
can be resumed until the receiver's deadline frees it; ``abort`` ends it explicitly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from libs.common.errors import BadRequest, TransferFailed, UpstreamTimeout
from libs.common.messages import KvChunk, KvManifest
from libs.common.state_parts import StatePart
from libs.kvwire.codecs import encode
from libs.kvwire.format import (
    PartSpec,
    build_manifest,
    checksum_fn,
    chunk_count,
    part_digest,
    part_key,
    unpack_bitmap,
)
from libs.kvwire.link import Link
from libs.kvwire.linkstats import KvLinks

log = logging.getLogger(__name__)


class TransportBroken(Exception):
    """A session lost its connection or timed out; reopening it and resuming may succeed."""


class StaleConnection(TransportBroken):
    """A connection kept from an earlier transfer was gone before the receiver answered on it: not an attempt."""


@dataclass(frozen=True)
class Destination:
    """Where a decode instance receives: its site and name (JetStream), host and port (TCP)."""

    site: str
    instance: str = ""
    host: str = ""
    port: int = 0


@dataclass(frozen=True)
class OutChunk:
    """One chunk to send: a slice of a part's wire bytes (its checksum is computed on first use)."""

    part: int
    offset: int
    payload: memoryview
    part_wire_bytes: int
    source: EncodedPart
    index: int  # of the chunk in its part

    @property
    def checksum(self) -> int:
        """The payload's checksum."""
        return self.source.checksum(self.index)

    def header(self, transfer_id: str, attempt: int) -> KvChunk:
        """The chunk header that travels before the payload (computes the checksum if not yet done)."""
        return KvChunk(
            transfer_id=transfer_id,
            part=self.part,
            offset=self.offset,
            length=len(self.payload),
            checksum=self.checksum,
            part_wire_bytes=self.part_wire_bytes,
            attempt=attempt,
        )


class EncodedPart:
    """A part's wire bytes cut into chunks.

    A chunk's checksum is computed the first time it is needed: by a transport just before the
    chunk leaves (TCP: in its connection's thread, so the checksums of a part run in parallel and
    the socket then copies bytes that are hot in cache), or for the part digest at the end.
    """

    def __init__(self, index: int, wire: memoryview, chunk_bytes: int, algo: str, source: np.ndarray) -> None:
        self.index = index
        self.wire = wire
        self.chunk_bytes = chunk_bytes
        self.source = source  # keeps the array alive while its raw bytes are being sent
        self._fn = checksum_fn(algo)
        self._algo = algo
        self._checksums: list[int | None] = [None] * chunk_count(len(wire), chunk_bytes)

    def checksum(self, i: int) -> int:
        """Checksum of chunk ``i`` (thread-safe: a race computes the same value twice)."""
        value = self._checksums[i]
        if value is None:
            value = self._checksums[i] = self._fn(self.wire[i * self.chunk_bytes : (i + 1) * self.chunk_bytes])
        return value

    @property
    def digest(self) -> int:
        """The part digest (computes the checksums not computed yet: blocking on large parts)."""
        return part_digest([self.checksum(i) for i in range(len(self._checksums))], self._algo)

    def chunks(self, chunk_bytes: int) -> Iterator[OutChunk]:
        """All chunks, in order."""
        if chunk_bytes != self.chunk_bytes:
            raise BadRequest(f"part {self.index} is cut in chunks of {self.chunk_bytes}, not {chunk_bytes}")
        for i in range(len(self._checksums)):
            offset = i * chunk_bytes
            yield OutChunk(self.index, offset, self.wire[offset : offset + chunk_bytes], len(self.wire), self, i)


MissingChunks = Callable[[dict[int, bytes]], list[OutChunk]]


class SendSession(Protocol):
    """One open attempt of a transfer on a transport."""

    held: dict[int, bytes]  # what the receiver held when the session opened (part -> bitmap)
    complete: bool  # the receiver already holds the whole transfer
    sent_chunks: int
    sent_bytes: int
    resent_chunks: int
    stripes: int  # connections the session sends on

    def retransmits(self) -> int | None:
        """Segments the kernel retransmitted on the session's connections since it opened (None: not told)."""

    async def send(self, chunk: OutChunk) -> None:
        """Queue a chunk (waits for window space); ``TransportBroken`` if the session broke."""

    async def end(self, digests: list[int], missing: MissingChunks) -> None:
        """Deliver the end marker and return once the receiver verified every part."""

    async def close(self) -> None:
        """Release connections and threads (idempotent)."""


class SendTransport(Protocol):
    """A way to reach decode instances (direct TCP, JetStream)."""

    chunk_bytes: int  # the largest chunk it carries

    async def open(self, manifest: KvManifest, dest: Destination, link: Link) -> SendSession:
        """Begin (or resume) a transfer; typed errors when the receiver refuses it."""

    async def abort(self, transfer_id: str, dest: Destination, reason: str) -> None:
        """Tell the receiver to drop the transfer and free its memory."""


@dataclass(frozen=True)
class SenderConfig:
    """Retry policy and deadlines of a sender."""

    max_attempts: int = 4  # session opens per transfer: the first one and the resumes
    retry_backoff_s: float = 0.2
    transfer_timeout_s: float = 300.0
    paced_chunk_s: float = 0.005  # on a paced link, chunks of at most this much budget (smooth traffic)
    min_chunk_bytes: int = 64 << 10


@dataclass(frozen=True)
class SendReport:
    """What one ``send`` did."""

    transfer_id: str
    payload_bytes: int  # decoded bytes of every part
    wire_bytes: int  # encoded bytes of every part
    sent_bytes: int  # wire bytes put on the wire (resends included)
    skipped_bytes: int  # wire bytes never sent because the receiver already held them (resume)
    chunks_sent: int
    chunks_resent: int
    attempts: int
    duration_s: float  # from the send's start to the receiver's verification (compute and pacing waits included)
    pacing_wait_s: float = 0.0  # wall time a chunk of it waited for the pair's budget (its connections' waits once)
    stripes: int = 0  # connections it was sent on (the most of any attempt)
    retransmits: int | None = None  # segments the kernel retransmitted on its connections (None: not told)

    @property
    def delivered_bytes(self) -> int:
        """Wire bytes this send delivered, each once (resends and what the receiver already held not counted)."""
        return self.wire_bytes - self.skipped_bytes

    @property
    def goodput_gbps(self) -> float:
        """Delivered wire bits per second over the whole send (never the decoded size, nor bytes not sent)."""
        return self.delivered_bytes * 8 / max(self.duration_s, 1e-9) / 1e9

    @property
    def resumes(self) -> int:
        """Sessions reopened after the first (a broken connection, a timeout)."""
        return max(0, self.attempts - 1)


def encode_part(index: int, part: StatePart, manifest: KvManifest) -> EncodedPart:
    """Encode one part (CPU-bound for ``zstd`` and ``int8``: call it in a worker thread; ``raw`` is a view)."""
    spec = manifest.parts[index]
    array = part.array
    if array.dtype.str != spec.dtype or list(array.shape) != spec.shape:
        raise BadRequest(
            f"part {part.key}: got {array.dtype.str}{list(array.shape)}, manifest says {spec.dtype}{spec.shape}"
        )
    return EncodedPart(index, encode(array, spec.codec), manifest.chunk_bytes, manifest.checksum, array)


async def _aiter(parts: AsyncIterable[StatePart] | Iterable[StatePart]):
    if isinstance(parts, AsyncIterable):
        async for part in parts:
            yield part
    else:
        for part in parts:
            yield part


class KvSender:
    """Sends transfers over one transport, paced and counted per site pair by ``links``."""

    def __init__(self, transport: SendTransport, links: KvLinks, config: SenderConfig | None = None) -> None:
        self.transport = transport
        self.links = links
        self.config = config or SenderConfig()

    def chunk_bytes(self, dst_site: str) -> int:
        """Chunk size towards ``dst_site``: the transport's, or less on a paced link (a power of two)."""
        budget_gbps = self.links.link(dst_site).budget_gbps
        if budget_gbps == 0:
            return self.transport.chunk_bytes
        quantum = int(budget_gbps * 1e9 / 8 * self.config.paced_chunk_s)
        size = 1 << (max(quantum, 1).bit_length() - 1)
        return max(self.config.min_chunk_bytes, min(size, self.transport.chunk_bytes))

    def manifest(
        self,
        *,
        transfer_id: str,
        dst_site: str,
        model: str,
        block_size: int,
        num_tokens: int,
        specs: Iterable[PartSpec],
        skipped_block_hashes: Sequence[int] = (),
        request_id: str = "",
    ) -> KvManifest:
        """A manifest from this sender's site to ``dst_site``, chunked for that link."""
        return build_manifest(
            transfer_id=transfer_id,
            src_site=self.links.src_site,
            dst_site=dst_site,
            model=model,
            block_size=block_size,
            num_tokens=num_tokens,
            specs=specs,
            chunk_bytes=self.chunk_bytes(dst_site),
            skipped_block_hashes=skipped_block_hashes,
            request_id=request_id,
        )

    async def send(
        self,
        manifest: KvManifest,
        parts: AsyncIterable[StatePart] | Iterable[StatePart],
        dest: Destination,
    ) -> SendReport:
        """Send every part of ``manifest`` (yielded in any order, e.g. layer by layer) to ``dest``."""
        if manifest.chunk_bytes > self.transport.chunk_bytes:
            raise BadRequest(
                f"manifest chunk_bytes {manifest.chunk_bytes} over the transport's {self.transport.chunk_bytes}"
            )
        link = self.links.link(manifest.dst_site)
        run = _Run(self, manifest, dest, link)
        link.transfer_started(manifest.transfer_id)
        run.order = link.order_of(manifest.transfer_id)
        ok = False
        try:
            async with asyncio.timeout(self.config.transfer_timeout_s):
                report = await run.execute(parts)
            ok = True
            return report
        except TimeoutError as e:
            raise UpstreamTimeout(
                f"transfer {manifest.transfer_id}: not done after {self.config.transfer_timeout_s:.0f}s"
            ) from e
        finally:
            await run.close()
            link.bucket.forget(run.order)
            link.transfer_ended(manifest.transfer_id, ok)

    async def abort(self, transfer_id: str, dest: Destination, reason: str = "aborted by sender") -> None:
        """Make the receiver drop a transfer and free its memory."""
        await self.transport.abort(transfer_id, dest, reason)


class _Run:
    """State of one ``send`` across session attempts."""

    def __init__(self, sender: KvSender, manifest: KvManifest, dest: Destination, link: Link) -> None:
        self.sender = sender
        self.manifest = manifest
        self.dest = dest
        self.link = link
        self.keys = {part_key(spec): i for i, spec in enumerate(manifest.parts)}
        self.encoded: dict[int, EncodedPart] = {}
        self.session: SendSession | None = None
        self.attempts = 0
        self.stale = 0  # reopens after a kept connection turned out to be gone (not attempts)
        self.sent_keys: dict[tuple[int, int], int] = {}  # chunks this run sent at least once -> size
        self.closed_chunks = self.closed_bytes = self.closed_resent = 0  # of sessions already closed
        self.closed_retransmits: int | None = None
        self.stripes = 0
        self.order = 0  # the transfer's pacing order on the link

    async def execute(self, parts: AsyncIterable[StatePart] | Iterable[StatePart]) -> SendReport:
        """Open, stream every part as it comes, end, resume whenever the session breaks."""
        started = time.monotonic()
        await self._reopen(None)
        async for part in _aiter(parts):
            index = self.keys.get(part.key)
            if index is None:
                raise BadRequest(f"part {part.key} is not in the manifest of {self.manifest.transfer_id}")
            if index in self.encoded:
                raise BadRequest(f"part {part.key} given twice")
            if self.manifest.parts[index].codec == "raw":
                encoded = encode_part(index, part, self.manifest)  # a view: nothing to compute
            else:
                encoded = await asyncio.to_thread(encode_part, index, part, self.manifest)
            self.encoded[index] = encoded
            await self._push([encoded])
        if len(self.encoded) != len(self.manifest.parts):
            missing = [part_key(s) for i, s in enumerate(self.manifest.parts) if i not in self.encoded]
            raise BadRequest(f"parts never given: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        digests = await asyncio.to_thread(lambda: [self.encoded[i].digest for i in range(len(self.manifest.parts))])
        while True:
            try:
                await self._session().end(digests, self._missing)
                break
            except TransportBroken as e:
                await self._reopen(e)
                await self._push(list(self.encoded.values()))
        return self._report(time.monotonic() - started)

    def _session(self) -> SendSession:
        if self.session is None:
            raise TransferFailed(f"transfer {self.manifest.transfer_id}: no open session")
        return self.session

    def _missing(self, held: dict[int, bytes]) -> list[OutChunk]:
        """Chunks of every encoded part that ``held`` lacks."""
        return list(self._lacking(list(self.encoded.values()), held))

    def _lacking(self, encoded: list[EncodedPart], held: dict[int, bytes]) -> Iterator[OutChunk]:
        step = self.manifest.chunk_bytes
        for enc in encoded:
            have = unpack_bitmap(held.get(enc.index, b""), chunk_count(len(enc.wire), step))
            for chunk, h in zip(enc.chunks(step), have, strict=True):
                if not h:
                    self.sent_keys[(chunk.part, chunk.offset)] = len(chunk.payload)
                    yield chunk

    async def _push(self, encoded: list[EncodedPart]) -> None:
        """Send the chunks of ``encoded`` the receiver lacks, reopening the session when it breaks."""
        while True:
            session = self._session()
            if session.complete:
                return
            try:
                for chunk in self._lacking(encoded, session.held):
                    await session.send(chunk)
                return
            except TransportBroken as e:
                await self._reopen(e)
                encoded = list(self.encoded.values())

    async def _reopen(self, cause: Exception | None) -> None:
        await self.close()
        while True:
            if isinstance(cause, StaleConnection) and self.stale < self.sender.config.max_attempts:
                self.stale += 1  # the same attempt again, on fresh connections
            elif self.attempts >= self.sender.config.max_attempts:
                raise TransferFailed(
                    f"transfer {self.manifest.transfer_id}: gave up after {self.attempts} attempts: {cause!r}"
                ) from cause
            else:
                if self.attempts:
                    log.warning(
                        "transfer resuming",
                        extra={
                            "transfer_id": self.manifest.transfer_id,
                            "attempt": self.attempts + 1,
                            "cause": repr(cause),
                        },
                    )
                    await asyncio.sleep(self.sender.config.retry_backoff_s * self.attempts)
                self.attempts += 1
            try:
                self.session = await self.sender.transport.open(self.manifest, self.dest, self.link)
                self.stripes = max(self.stripes, self.session.stripes)
                return
            except TransportBroken as e:
                cause = e

    async def close(self) -> None:
        """Close the current session, keeping its counts."""
        session, self.session = self.session, None
        if session is not None:
            self.closed_retransmits = _add(self.closed_retransmits, session.retransmits())
            await session.close()
            self.closed_chunks += session.sent_chunks
            self.closed_bytes += session.sent_bytes
            self.closed_resent += session.resent_chunks

    def _report(self, duration_s: float) -> SendReport:
        session = self._session()
        return SendReport(
            transfer_id=self.manifest.transfer_id,
            payload_bytes=sum(spec.nbytes for spec in self.manifest.parts),
            wire_bytes=sum(len(e.wire) for e in self.encoded.values()),
            sent_bytes=self.closed_bytes + session.sent_bytes,
            skipped_bytes=sum(len(e.wire) for e in self.encoded.values()) - sum(self.sent_keys.values()),
            chunks_sent=self.closed_chunks + session.sent_chunks,
            chunks_resent=self.closed_resent + session.resent_chunks,
            attempts=self.attempts,
            duration_s=duration_s,
            pacing_wait_s=self.link.bucket.waited_s(self.order),
            stripes=self.stripes,
            retransmits=_add(self.closed_retransmits, session.retransmits()),
        )


def _add(total: int | None, more: int | None) -> int | None:
    """A sum of counts some of which may be unknown (None: none was known)."""
    return total if more is None else (total or 0) + more
