"""Part codecs: ``raw`` and ``zstd`` (lossless, any part) and ``int8`` (lossy, ``attn_kv`` only).

``int8`` quantises the flattened float array in groups of ``INT8_GROUP_ELEMS`` elements with one
float32 scale per group (``absmax / 127``); its wire form is the scales followed by the int8
values. Each restored element is within ``absmax(group) / 254`` of the original, plus the
rounding of the output dtype. Linear-attention state is never quantised: it is a recurrent state
whose error would compound over every decoded token.
"""

from __future__ import annotations

import numpy as np
import zstandard

from libs.common.errors import BadRequest, TransferFailed
from libs.common.messages import Codec, KvPartSpec, StateKind

CODECS: tuple[Codec, ...] = ("raw", "zstd", "int8")
LOSSLESS: frozenset[str] = frozenset({"raw", "zstd"})
INT8_GROUP_ELEMS = 64
ZSTD_LEVEL = 1


def check_codec(codec: str, kind: StateKind, dtype: np.dtype, key: str) -> None:
    """Reject a codec unknown, or lossy where it must not be (``BadRequest``)."""
    if codec not in CODECS:
        raise BadRequest(f"part {key}: unknown codec {codec!r} (have {', '.join(CODECS)})")
    if codec == "int8":
        if kind != "attn_kv":
            raise BadRequest(f"part {key}: lossy codec int8 is for attn_kv only, not {kind}")
        if dtype.kind != "f":
            raise BadRequest(f"part {key}: int8 needs a float array, not {dtype}")


def _groups(count: int) -> int:
    return -(-count // INT8_GROUP_ELEMS)


def max_wire_bytes(spec: KvPartSpec) -> int:
    """Upper bound of a part's encoded size (what a receiver reserves for its wire buffer)."""
    if spec.codec == "raw":
        return spec.nbytes
    if spec.codec == "zstd":
        # ZSTD_COMPRESSBOUND plus the frame header.
        small = ((128 << 10) - spec.nbytes) >> 11 if spec.nbytes < (128 << 10) else 0
        return spec.nbytes + (spec.nbytes >> 8) + small + 64
    count = spec.nbytes // np.dtype(spec.dtype).itemsize
    return 4 * _groups(count) + count


def as_bytes(array: np.ndarray) -> memoryview:
    """The array's buffer as a flat byte memoryview (no copy; the array must be C-contiguous)."""
    if not array.flags.c_contiguous:
        raise BadRequest("state arrays must be C-contiguous")
    return memoryview(array.reshape(-1).view(np.uint8))


def encode(array: np.ndarray, codec: Codec) -> memoryview:
    """A part's wire bytes (``raw`` is the array's own buffer, not a copy)."""
    if codec == "raw":
        return as_bytes(array)
    if codec == "zstd":
        return memoryview(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(as_bytes(array)))
    return memoryview(_int8_encode(array))


def decode_into(wire: memoryview, spec: KvPartSpec, out: np.ndarray) -> None:
    """Restore a non-raw part's array into ``out`` (``TransferFailed`` if the bytes do not decode)."""
    key = f"{spec.layer}/{spec.kind}/{spec.name}"
    if spec.codec == "zstd":
        try:
            data = zstandard.ZstdDecompressor().decompress(wire, max_output_size=spec.nbytes)
        except zstandard.ZstdError as e:
            raise TransferFailed(f"part {key}: zstd payload does not decode: {e}") from e
        if len(data) != spec.nbytes:
            raise TransferFailed(f"part {key}: zstd restored {len(data)} bytes, manifest says {spec.nbytes}")
        as_bytes(out)[:] = data
    elif spec.codec == "int8":
        _int8_decode_into(wire, out, key)
    else:
        raise TransferFailed(f"part {key}: codec {spec.codec} has no decode step")


def _int8_encode(array: np.ndarray) -> bytes:
    flat = array.reshape(-1).astype(np.float32)
    count = flat.size
    groups = _groups(count)
    padded = np.zeros(groups * INT8_GROUP_ELEMS, dtype=np.float32)
    padded[:count] = flat
    blocks = padded.reshape(groups, INT8_GROUP_ELEMS)
    absmax = np.abs(blocks).max(axis=1) if groups else np.zeros(0, dtype=np.float32)
    if not np.isfinite(absmax).all():
        raise BadRequest("int8 codec needs finite values (within float32 range)")
    scales = (absmax / np.float32(127.0)).astype("<f4")
    safe = np.where(scales > 0, scales, np.float32(1.0))
    quant = np.rint(blocks / safe[:, None]).astype(np.int8)
    return scales.tobytes() + quant.reshape(-1)[:count].tobytes()


def _int8_decode_into(wire: memoryview, out: np.ndarray, key: str) -> None:
    count = out.size
    groups = _groups(count)
    if len(wire) != 4 * groups + count:
        raise TransferFailed(f"part {key}: int8 payload has {len(wire)} bytes, expected {4 * groups + count}")
    scales = np.frombuffer(wire, dtype="<f4", count=groups)
    quant = np.frombuffer(wire, dtype=np.int8, offset=4 * groups, count=count)
    values = quant.astype(np.float32)
    values *= np.repeat(scales, INT8_GROUP_ELEMS)[:count]
    out.reshape(-1)[:] = values
