"""Hybrid prefix-block cache: both state kinds in one byte budget, LRU eviction, KV events out.

Blocks are named by chained hashes (``libs.common.hashing``). An ``attn_kv`` block holds the
full-attention KV of its tokens; a ``linear_state`` block holds the linear state checkpointed at
its end. A prompt can resume after ``k`` blocks when every ``attn_kv`` block ``0..k-1`` and the
``linear_state`` block ``k-1`` are held. Using a prefix marks its blocks recently used from the
last to the first, so the tail of a chain is evicted before its root (which more prompts share).
A pinned block (a decode instance holding a request's prefix until the request ends) is never
evicted; pins are counted, so two requests may pin the same block.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from libs.common.messages import AllBlocksCleared, BlocksEvicted, BlocksStored, KvEvent, KvSnapshot, StateKind

_Key = tuple[str, int]


@dataclass
class _Entry:
    payload: Any
    nbytes: int
    parent: int | None
    pins: int = 0


class PrefixCache:
    """Prefix blocks of the kinds a model has, within ``capacity_bytes``; records what it stores and evicts."""

    def __init__(self, capacity_bytes: int, kinds: Sequence[StateKind] = ("attn_kv", "linear_state")) -> None:
        self.capacity_bytes = capacity_bytes
        self.kinds = tuple(kinds)
        self.used_bytes = 0
        self._entries: OrderedDict[_Key, _Entry] = OrderedDict()  # least recently used first
        self._events: list[KvEvent] = []

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, kind: StateKind, block_hash: int) -> bool:
        """True if the block of that kind is cached."""
        return (kind, block_hash) in self._entries

    def leading_blocks(self, kind: StateKind, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt are held in ``kind`` (without a linear checkpoint)."""
        if kind not in self.kinds:
            return 0
        return next((i for i, h in enumerate(hashes) if (kind, h) not in self._entries), len(hashes))

    def pin(self, kind: StateKind, hashes: Sequence[int]) -> None:
        """Keep these held blocks from eviction until ``unpin`` (``KeyError`` if one is not held)."""
        entries = [self._entries[(kind, h)] for h in hashes]
        for entry in entries:
            entry.pins += 1

    def unpin(self, kind: StateKind, hashes: Sequence[int]) -> None:
        """Release one pin of each block (evictable again once no pin is left)."""
        for h in hashes:
            entry = self._entries.get((kind, h))
            if entry is not None and entry.pins:
                entry.pins -= 1

    def payloads(self, kind: StateKind, hashes: Sequence[int]) -> list[Any]:
        """Payloads of held blocks, in order, marked used tail first (``KeyError`` if one is not held)."""
        found = [self._entries[(kind, h)].payload for h in hashes]
        for h in reversed(hashes):
            self._entries.move_to_end((kind, h))
        return found

    def usable_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt (its chained hashes) can be skipped by prefill."""
        k = self.leading_blocks("attn_kv", hashes) if "attn_kv" in self.kinds else len(hashes)
        if "linear_state" in self.kinds:
            while k and ("linear_state", hashes[k - 1]) not in self._entries:
                k -= 1
        return k

    def take_prefix(self, hashes: Sequence[int], n_blocks: int) -> tuple[list[Any], Any]:
        """Payloads of the first ``n_blocks`` ``attn_kv`` blocks and of the ``linear_state`` at the last one.

        Marks them used (tail first). Missing kinds give an empty list / ``None``.
        """
        if n_blocks == 0:
            return [], None
        attn, linear = [], None
        for i in range(n_blocks - 1, -1, -1):
            key = ("attn_kv", hashes[i])
            if "attn_kv" in self.kinds:
                self._entries.move_to_end(key)
                attn.append(self._entries[key].payload)
        if "linear_state" in self.kinds:
            key = ("linear_state", hashes[n_blocks - 1])
            self._entries.move_to_end(key)
            linear = self._entries[key].payload
        attn.reverse()
        return attn, linear

    def store(
        self, kind: StateKind, hashes: Sequence[int], payloads: Sequence[Any], nbytes: Sequence[int], parent: int | None
    ) -> None:
        """Hold a chain of blocks (``parent`` is the hash before ``hashes[0]``, None at the root), then evict."""
        new: set[int] = set()
        parents = [parent, *hashes[:-1]]
        for h, payload, size, p in zip(hashes, payloads, nbytes, parents, strict=True):
            key = (kind, h)
            if key not in self._entries:
                self._entries[key] = _Entry(payload, size, p)
                self.used_bytes += size
                new.add(h)
        for h in reversed(hashes):
            self._entries.move_to_end((kind, h))
        evicted = self._evict()
        runs: list[list[int]] = []
        for i, h in enumerate(hashes):
            if h in new and (kind, h) in self._entries:
                if runs and runs[-1][-1] == parents[i]:
                    runs[-1].append(h)
                else:
                    runs.append([h])
        for run in runs:
            self._events.append(
                BlocksStored(block_hashes=run, kind=kind, parent_hash=self._entries[(kind, run[0])].parent)
            )
        for ev_kind, ev_hashes in evicted.items():
            old = [h for h in ev_hashes if not (ev_kind == kind and h in new)]
            if old:
                self._events.append(BlocksEvicted(block_hashes=old, kind=ev_kind))

    def _evict(self) -> dict[str, list[int]]:
        """Drop least recently used unpinned blocks until the cache fits its capacity."""
        evicted: dict[str, list[int]] = defaultdict(list)
        if self.used_bytes <= self.capacity_bytes:
            return evicted
        victims = []
        excess = self.used_bytes - self.capacity_bytes
        for key, entry in self._entries.items():
            if excess <= 0:
                break
            if not entry.pins:
                victims.append(key)
                excess -= entry.nbytes
        for key in victims:
            self.used_bytes -= self._entries.pop(key).nbytes
            evicted[key[0]].append(key[1])
        return evicted

    def clear(self) -> None:
        """Drop every block (reported as one ``AllBlocksCleared`` event)."""
        self._entries.clear()
        self.used_bytes = 0
        self._events.append(AllBlocksCleared())

    def drain_events(self) -> list[KvEvent]:
        """Events since the last call, in order (what a gateway publishes as a ``KvEventBatch``)."""
        events, self._events = self._events, []
        return events

    def snapshot(self) -> KvSnapshot:
        """Everything held, as chains of stored blocks per kind (answers a ``KvSnapshotRequest``)."""
        stored = []
        for kind in self.kinds:
            held = {h: e.parent for (k, h), e in self._entries.items() if k == kind}
            children: dict[int | None, list[int]] = defaultdict(list)
            for h, p in held.items():
                children[p].append(h)
            starts = [(h, p) for h, p in held.items() if p not in held]
            while starts:
                h, p = starts.pop()
                run = [h]
                while children.get(run[-1]):
                    first, *others = children[run[-1]]
                    starts.extend((o, run[-1]) for o in others)
                    run.append(first)
                stored.append(BlocksStored(block_hashes=run, kind=kind, parent_hash=p))
        return KvSnapshot(stored=stored)
