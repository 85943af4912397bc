"""One incoming transfer: where each chunk lands, what is verified, and the restored parts.

Chunks are written by the transport straight into the transfer's arena region (a raw part's wire
bytes are its array's bytes), verified in place, and recorded. A chunk already held, or being
written by another connection, is not written again: the transport reads it into scratch space,
so a resent or duplicated chunk is harmless (one being written elsewhere is refused: resend later). The region is released only once no write is in
progress, so an abort never lets a late write land in memory handed to another transfer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from libs.common.errors import BadRequest, TransferFailed
from libs.common.messages import KvChunk, KvManifest, KvPartHeld, KvPartSpec
from libs.common.state_parts import StatePart
from libs.kvwire.arena import Arena, Region, align
from libs.kvwire.codecs import decode_into, max_wire_bytes
from libs.kvwire.format import bitmap, checksum_fn, chunk_count, part_digest, part_key


def required_bytes(manifest: KvManifest) -> int:
    """Arena bytes a transfer needs: every array, plus a wire buffer for each encoded part."""
    total = 0
    for spec in manifest.parts:
        total += align(spec.nbytes)
        if spec.codec != "raw":
            total += align(max_wire_bytes(spec))
    return total


class _Part:
    """Receive state of one part."""

    __slots__ = ("spec", "array", "wire", "wire_bytes", "checksums", "writing", "held")

    def __init__(self, spec: KvPartSpec, array: np.ndarray, wire: np.ndarray) -> None:
        self.spec = spec
        self.array = array
        self.wire = wire  # the array's own bytes for raw parts
        self.wire_bytes: int | None = spec.nbytes if spec.codec == "raw" else None
        self.checksums: list[int | None] = []
        self.writing: set[int] = set()
        self.held = 0

    def ensure_layout(self, wire_bytes: int, chunk_bytes: int) -> None:
        """Fix the part's wire size on its first chunk (every chunk must agree)."""
        if self.wire_bytes is None:
            if wire_bytes > len(self.wire):
                raise BadRequest(f"part {part_key(self.spec)}: {wire_bytes} wire bytes exceed the codec bound")
            self.wire_bytes = wire_bytes
        elif wire_bytes != self.wire_bytes:
            raise BadRequest(f"part {part_key(self.spec)}: wire size {wire_bytes}, expected {self.wire_bytes}")
        if not self.checksums:
            self.checksums = [None] * chunk_count(self.wire_bytes, chunk_bytes)

    @property
    def complete(self) -> bool:
        """Every chunk verified."""
        return bool(self.checksums) and self.held == len(self.checksums)


class TransferAssembly:
    """Receive state of one transfer inside its arena region (thread-safe)."""

    def __init__(self, manifest: KvManifest, arena: Arena, region: Region, release: Callable[[], None]) -> None:
        self.manifest = manifest
        self.region = region
        self._release = release
        self._checksum = checksum_fn(manifest.checksum)
        self._lock = threading.Lock()
        self._writers = 0
        self._closed = False
        self.complete = False
        self.duplicate_chunks = 0
        self.bad_chunks = 0
        self.received_bytes = 0
        self._parts: list[_Part] = []
        memory = arena.view(region)
        cursor = 0
        for spec in manifest.parts:
            raw = memory[cursor : cursor + spec.nbytes]
            cursor += align(spec.nbytes)
            array = raw.view(np.dtype(spec.dtype)).reshape(spec.shape)
            wire = raw
            if spec.codec != "raw":
                size = max_wire_bytes(spec)
                wire = memory[cursor : cursor + size]
                cursor += align(size)
            self._parts.append(_Part(spec, array, wire))

    def target(self, chunk: KvChunk) -> memoryview | bool:
        """Where this chunk's payload goes; else (read it into scratch) True if held, False if being written."""
        if not 0 <= chunk.part < len(self._parts):
            raise BadRequest(f"chunk for part {chunk.part}: the manifest has {len(self._parts)} parts")
        step = self.manifest.chunk_bytes
        with self._lock:
            if self._closed:
                raise TransferFailed(f"transfer {self.manifest.transfer_id} is closed")
            part = self._parts[chunk.part]
            part.ensure_layout(chunk.part_wire_bytes, step)
            index, rest = divmod(chunk.offset, step)
            expected = min(step, part.wire_bytes - chunk.offset) if part.wire_bytes else 0
            if rest or index >= len(part.checksums) or chunk.length != expected:
                raise BadRequest(
                    f"chunk {chunk.offset}+{chunk.length} of part {part_key(part.spec)} does not match "
                    f"its layout ({part.wire_bytes} bytes in chunks of {step})"
                )
            if part.checksums[index] is not None:
                self.duplicate_chunks += 1
                return True
            if index in part.writing:
                return False
            part.writing.add(index)
            self._writers += 1
            return memoryview(part.wire[chunk.offset : chunk.offset + chunk.length])

    def commit(self, chunk: KvChunk, payload: memoryview) -> bool:
        """Verify a payload written at ``target(chunk)``; False means corrupt (ask for it again)."""
        ok = self._checksum(payload) == chunk.checksum
        release = False
        with self._lock:
            part = self._parts[chunk.part]
            index = chunk.offset // self.manifest.chunk_bytes
            part.writing.discard(index)
            self._writers -= 1
            if self._closed:
                release = self._writers == 0
                ok = False
            elif ok:
                part.checksums[index] = chunk.checksum
                part.held += 1
                self.received_bytes += chunk.length
            else:
                self.bad_chunks += 1
        if release:
            self._release()
        return ok

    def abandon(self, chunk: KvChunk) -> None:
        """A write at ``target(chunk)`` did not finish (connection lost): the chunk is not held."""
        with self._lock:
            self._parts[chunk.part].writing.discard(chunk.offset // self.manifest.chunk_bytes)
            self._writers -= 1
            release = self._closed and self._writers == 0
        if release:
            self._release()

    def held(self) -> list[KvPartHeld]:
        """Verified chunks of every part that has any."""
        with self._lock:
            return [
                KvPartHeld(part=i, chunks=bitmap([c is not None for c in part.checksums]))
                for i, part in enumerate(self._parts)
                if part.held
            ]

    def finish(self, digests: list[int]) -> bool:
        """Check every part against the sender's digests and restore encoded parts.

        Returns False while chunks are missing; raises ``TransferFailed`` when a part's digest
        differs (the receiver holds chunks the sender did not checksum this time).
        """
        if len(digests) != len(self._parts):
            raise BadRequest(f"end marker has {len(digests)} digests for {len(self._parts)} parts")
        with self._lock:
            if self.complete:
                return True
            if self._closed:
                raise TransferFailed(f"transfer {self.manifest.transfer_id} is closed")
            if not all(part.complete for part in self._parts):
                return False
            for part, digest in zip(self._parts, digests, strict=True):
                if part_digest(part.checksums, self.manifest.checksum) != digest:
                    raise TransferFailed(f"part {part_key(part.spec)}: digest mismatch (stale or foreign chunks)")
        for part in self._parts:
            if part.spec.codec != "raw":
                decode_into(memoryview(part.wire[: part.wire_bytes]), part.spec, part.array)
        with self._lock:
            self.complete = True
        return True

    def parts(self) -> list[StatePart]:
        """The restored parts (views of the arena region, valid until the transfer is released)."""
        return [StatePart(p.spec.layer, p.spec.kind, p.spec.name, p.array) for p in self._parts]

    def close(self) -> None:
        """Stop accepting chunks; the region is released now, or by the last write in progress."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            release = self._writers == 0
        if release:
            self._release()
