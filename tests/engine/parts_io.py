"""Test helper: a request's StateParts to one msgpack blob and back (the real wire is libs.kvwire)."""

from __future__ import annotations

import msgspec
import numpy as np

from libs.common.state_parts import StatePart


class _Part(msgspec.Struct, array_like=True):
    layer: int
    kind: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def dump_parts(parts: list[StatePart]) -> bytes:
    """One blob holding every part's header and raw buffer."""
    return msgspec.msgpack.encode(
        [_Part(p.layer, p.kind, p.name, p.array.dtype.str, p.array.shape, memoryview(p.array).cast("B")) for p in parts]
    )


def load_parts(blob: bytes) -> list[StatePart]:
    """Parts whose arrays are read-only views of the decoded buffers."""
    return [
        StatePart(p.layer, p.kind, p.name, np.frombuffer(p.data, dtype=p.dtype).reshape(p.shape))
        for p in msgspec.msgpack.decode(blob, type=list[_Part])
    ]
