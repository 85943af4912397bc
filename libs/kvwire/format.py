"""Transfer format: manifests from part specs, chunk layout, checksums, digests and TCP frames.

A part's wire bytes (its array encoded by the part's codec) are cut into chunks of the manifest's
``chunk_bytes``; chunk ``i`` covers ``[i * chunk_bytes, min((i + 1) * chunk_bytes, wire_bytes))``,
so a resuming sender cuts exactly the same chunks. Every chunk carries a checksum of its payload;
a part's digest is the checksum of its chunks' checksums (u32 little-endian, in order), so the
receiver can prove it holds exactly the chunks the sender checksummed without a second pass over
the data.

On TCP a frame is ``<u32 little-endian header length><msgpack header>`` followed, for a chunk, by
the chunk's ``length`` payload bytes.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from libs.common import subjects
from libs.common.errors import BadRequest
from libs.common.messages import ChecksumAlgo, KvChunk, KvManifest, KvPartHeld, KvPartSpec
from libs.common.state_parts import PartSpec
from libs.kvwire.codecs import check_codec

FRAME_PREFIX = struct.Struct("<I")
MAX_HEADER_BYTES = 1 << 20  # a manifest of thousands of parts still fits; anything larger is garbage
DEFAULT_CHUNK_BYTES = 4 << 20
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 4096, 64 << 20
MAX_DIMS = 16  # of a part's shape
_ARRAY_KINDS = "biufc"  # plain numbers: no objects, records or sub-arrays


def _fast_crc32() -> Callable[..., int] | None:
    """ISA-L's CRC-32 (``isal``): the same values as ``zlib.crc32``, about 8x faster (carry-less multiply)."""
    try:
        from isal.isal_zlib import crc32
    except ImportError:
        return None
    return crc32


def _available_checksums() -> dict[str, Callable[..., int]]:
    """Checksum functions by name (every one releases the GIL on large buffers)."""
    algos: dict[str, Callable[..., int]] = {"crc32": _fast_crc32() or zlib.crc32}
    try:
        from crc32c import crc32c  # hardware CRC-32C, ~4x zlib, half ISA-L's CRC-32
    except ImportError:
        return algos
    algos["crc32c"] = crc32c
    return algos


CHECKSUMS = _available_checksums()
# The fastest here; a receiver verifies whatever the manifest names (``crc32`` everywhere, slower without isal).
DEFAULT_CHECKSUM: ChecksumAlgo = "crc32" if _fast_crc32() else "crc32c" if "crc32c" in CHECKSUMS else "crc32"


def checksum_fn(algo: str) -> Callable[..., int]:
    """The checksum function named by a manifest (``BadRequest`` if this process lacks it)."""
    try:
        return CHECKSUMS[algo]
    except KeyError:
        raise BadRequest(f"checksum {algo!r} is not available here (have {sorted(CHECKSUMS)})") from None


def part_key(spec: KvPartSpec) -> str:
    """``<layer>/<kind>/<name>`` of a manifest part."""
    return f"{spec.layer}/{spec.kind}/{spec.name}"


def build_manifest(
    *,
    transfer_id: str,
    src_site: str,
    dst_site: str,
    model: str,
    block_size: int,
    num_tokens: int,
    specs: Iterable[PartSpec],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    checksum: ChecksumAlgo = DEFAULT_CHECKSUM,
    skipped_block_hashes: Sequence[int] = (),
    request_id: str = "",
) -> KvManifest:
    """A validated manifest listing every part up front (parts may be produced later)."""
    parts: list[KvPartSpec] = []
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if any(d < 0 for d in spec.shape):
            raise BadRequest(f"part {spec.key}: negative dimension in shape {spec.shape}")
        check_codec(spec.codec, spec.kind, dtype, spec.key)
        nbytes = int(np.prod(spec.shape, dtype=np.int64)) * dtype.itemsize
        parts.append(
            KvPartSpec(
                layer=spec.layer,
                kind=spec.kind,
                name=spec.name,
                dtype=dtype.str,
                shape=list(spec.shape),
                nbytes=nbytes,
                codec=spec.codec,
            )
        )
    manifest = KvManifest(
        transfer_id=transfer_id,
        src_site=src_site,
        dst_site=dst_site,
        model=model,
        block_size=block_size,
        num_tokens=num_tokens,
        parts=parts,
        chunk_bytes=chunk_bytes,
        checksum=checksum,
        skipped_block_hashes=list(skipped_block_hashes),
        request_id=request_id,
    )
    validate_manifest(manifest)
    return manifest


def validate_manifest(manifest: KvManifest) -> None:
    """Reject a manifest that is inconsistent (``BadRequest`` naming the problem)."""
    try:
        subjects.token(manifest.transfer_id, "transfer id")
        subjects.token(manifest.src_site, "site")
        subjects.token(manifest.dst_site, "site")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if not MIN_CHUNK_BYTES <= manifest.chunk_bytes <= MAX_CHUNK_BYTES:
        raise BadRequest(f"chunk_bytes {manifest.chunk_bytes} outside [4 KiB, 64 MiB]")
    checksum_fn(manifest.checksum)
    seen: set[str] = set()
    for spec in manifest.parts:
        key = part_key(spec)
        if key in seen:
            raise BadRequest(f"part {key} listed twice")
        seen.add(key)
        try:
            dtype = np.dtype(spec.dtype)
        except TypeError as e:
            raise BadRequest(f"part {key}: bad dtype {spec.dtype!r}") from e
        if dtype.kind not in _ARRAY_KINDS or len(spec.shape) > MAX_DIMS or any(d < 0 for d in spec.shape):
            raise BadRequest(f"part {key}: unsupported dtype {spec.dtype} or shape {spec.shape}")
        if math.prod(spec.shape) * dtype.itemsize != spec.nbytes:  # exact: no int64 wrap-around to a small size
            raise BadRequest(f"part {key}: nbytes {spec.nbytes} does not match {spec.dtype}{spec.shape}")
        check_codec(spec.codec, spec.kind, dtype, key)


def check_chunk(chunk: KvChunk, chunk_bytes: int = MAX_CHUNK_BYTES) -> None:
    """Reject a chunk header whose numbers no layout allows: negative, or a payload longer than ``chunk_bytes``."""
    if min(chunk.part, chunk.offset, chunk.part_wire_bytes) < 0 or not 0 <= chunk.length <= chunk_bytes:
        raise BadRequest(
            f"chunk {chunk.part}@{chunk.offset}+{chunk.length} of {chunk.part_wire_bytes} wire bytes: "
            f"negative, or over {chunk_bytes} bytes"
        )


def chunk_count(wire_bytes: int, chunk_bytes: int) -> int:
    """Number of chunks of a part (an empty part has one empty chunk, so it is still acknowledged)."""
    return max(1, -(-wire_bytes // chunk_bytes))


def part_digest(checksums: Sequence[int], algo: str) -> int:
    """Digest of a part: the checksum of its chunk checksums as little-endian u32s."""
    return checksum_fn(algo)(np.asarray(checksums, dtype="<u4").tobytes())


def bitmap(bits: Sequence[bool] | np.ndarray) -> bytes:
    """Pack booleans into a little-endian bitmap."""
    return np.packbits(np.asarray(bits, dtype=bool), bitorder="little").tobytes()


def unpack_bitmap(data: bytes, count: int) -> np.ndarray:
    """The first ``count`` booleans of a little-endian bitmap."""
    raw = np.zeros(-(-count // 8), dtype=np.uint8)
    given = np.frombuffer(data, dtype=np.uint8)[: len(raw)]
    raw[: len(given)] = given
    return np.unpackbits(raw, bitorder="little")[:count].astype(bool)


def held_map(held: Iterable[KvPartHeld]) -> dict[int, bytes]:
    """Resume state as ``part index -> bitmap``."""
    return {h.part: h.chunks for h in held}


def frame(header: bytes) -> bytes:
    """A TCP frame's prefix and header (the chunk payload, if any, is sent after it)."""
    return FRAME_PREFIX.pack(len(header)) + header
