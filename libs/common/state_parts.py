"""A request's model state as a list of typed parts: what engines produce and transfers carry."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import numpy as np

from libs.common.messages import Codec, StateKind


@dataclass(frozen=True)
class StatePart:
    """One array of a request's state: a layer's attention K or V, or a linear-layer state.

    ``name`` tells parts of one layer apart (for example ``"k"``, ``"v"``, ``"state"``, or
    ``"ckpt.3"`` for the linear state checkpointed at block boundary 3). ``array`` is
    C-contiguous; its buffer is sent as is (no copy).
    """

    layer: int
    kind: StateKind
    name: str
    array: np.ndarray

    @property
    def key(self) -> str:
        """Stable identifier of the part within a request: ``<layer>/<kind>/<name>``."""
        return f"{self.layer}/{self.kind}/{self.name}"

    @property
    def nbytes(self) -> int:
        """Size of the part's payload in bytes."""
        return int(self.array.nbytes)


class PartSpec(msgspec.Struct, kw_only=True, frozen=True):
    """A part known before it exists: identity, dtype, shape, and the codec it travels with.

    Engines list these up front (``plan_parts``) so a transfer's manifest can go out first.
    """

    layer: int
    kind: StateKind
    name: str
    shape: tuple[int, ...]
    dtype: str
    codec: Codec = "raw"

    @classmethod
    def of(cls, part: StatePart, codec: Codec = "raw") -> PartSpec:
        """The spec of an existing part."""
        return cls(
            layer=part.layer,
            kind=part.kind,
            name=part.name,
            shape=tuple(part.array.shape),
            dtype=part.array.dtype.str,
            codec=codec,
        )

    @property
    def key(self) -> str:
        """Same key as the ``StatePart`` it describes: ``<layer>/<kind>/<name>``."""
        return f"{self.layer}/{self.kind}/{self.name}"

    @property
    def nbytes(self) -> int:
        """Payload size in bytes (before any codec)."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize
