"""The receiver's transfer memory: one preallocated buffer, first-fit regions, freed right after use.

Received KV lands directly in its final place (the socket writes into the region), and a region
is returned as soon as the decode side has taken the state or the transfer is aborted, so transfer
memory never pollutes anything else (the paper's "transfer blocks"). Preallocating once, and
optionally touching every page up front, keeps page faults off the receive path.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

import numpy as np

ALIGN_BYTES = 64
_PAGE_BYTES = 4096


def align(nbytes: int) -> int:
    """``nbytes`` rounded up to the arena's alignment."""
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(frozen=True)
class Region:
    """A slice of the arena owned by one transfer."""

    offset: int
    nbytes: int


class Arena:
    """A fixed buffer of ``capacity_bytes`` handing out aligned regions (thread-safe)."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.capacity_bytes = align(capacity_bytes)
        self.buffer = np.empty(self.capacity_bytes, dtype=np.uint8)
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, self.capacity_bytes)]  # (offset, size), sorted by offset
        self.used_bytes = 0

    def prefault(self) -> None:
        """Touch every page so later writes do not fault (blocking: run it in a thread)."""
        self.buffer[::_PAGE_BYTES] = 0

    def allocate(self, nbytes: int) -> Region | None:
        """A region of at least ``nbytes`` (first fit), or None when no free extent is large enough."""
        size = max(align(nbytes), ALIGN_BYTES)
        with self._lock:
            for i, (offset, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (offset + size, free - size)
                    self.used_bytes += size
                    return Region(offset, size)
        return None

    def free(self, region: Region) -> None:
        """Return a region, merging it with free neighbours."""
        with self._lock:
            i = bisect.bisect_left(self._free, (region.offset, 0))
            offset, size = region.offset, region.nbytes
            if i < len(self._free) and offset + size == self._free[i][0]:
                size += self._free[i][1]
                del self._free[i]
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
                offset, size = self._free[i - 1][0], self._free[i - 1][1] + size
                del self._free[i - 1]
                i -= 1
            self._free.insert(i, (offset, size))
            self.used_bytes -= region.nbytes

    def view(self, region: Region) -> np.ndarray:
        """The region's bytes."""
        return self.buffer[region.offset : region.offset + region.nbytes]

    @property
    def largest_free_bytes(self) -> int:
        """Size of the largest free extent."""
        with self._lock:
            return max((size for _, size in self._free), default=0)
