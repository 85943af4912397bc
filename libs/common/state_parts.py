"""A request's model state as a list of typed parts: what engines produce and transfers carry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from libs.common.messages import StateKind


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
