"""Map an engine's block chain (often 16-token blocks) onto ours (e.g. 64-token blocks).

Each engine block is remembered with the state of our chain after its tokens: our last
complete block hash and the tokens pending since that boundary. A stored engine block extends
its parent's state with its own tokens; every time that fills one of our blocks, our hash is
computed from the tokens (``libs.common.hashing.block_hash``), so it equals what a router
computes for the same prompt. An engine eviction evicts each of our blocks that the evicted
engine block is part of. A ``linear_state`` checkpoint exists for one of our blocks only when
an engine block ends exactly at its boundary.

Blocks whose engine hash covers more than their tokens (a LoRA adapter, images, a cache salt)
are never ours, nor are their descendants: they are remembered as *foreign* so that their
children are recognised and skipped too. Blocks another node holds (``locality`` REMOTE) are
skipped, and so are their removals. A removal names a group, not a state kind, in current vLLM: the kind of
each group is learned from its stores.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

from libs.common.hashing import ROOT_HASH, block_hashes
from libs.common.messages import StateKind, Tier
from services.kv_index.engine_events import (
    EngineAllCleared,
    EngineBlockRemoved,
    EngineBlockStored,
    EngineEvent,
    EngineHash,
)

Key = tuple[StateKind, Tier]


_KEY_BITS: dict[Key, int] = {
    (kind, tier): 1 << i
    for i, (kind, tier) in enumerate((k, t) for k in ("attn_kv", "linear_state") for t in ("device", "host", "disk"))
}


class _Node(NamedTuple):
    """What we know of one engine block (kept as a plain tuple of atoms, which the GC stops tracking)."""

    parent: EngineHash | None
    our_parent: int  # our last complete block before the pending tokens
    pending: tuple[int, ...]  # tokens after that boundary, up to the end of this engine block
    foreign: bool = False  # named by more than its tokens: neither it nor its descendants are ours
    covers: tuple[int, ...] = ()  # our blocks this engine block is part of
    crossed_boundary: bool = False  # it completed at least one of our blocks
    ends_at_boundary: bool = False
    present: int = 0  # bits of the (kind, tier) keys it is held under (``_KEY_BITS``)


@dataclass(frozen=True)
class MappedChange:
    """One change in our block space: ``stored`` or ``evicted`` blocks, or ``cleared``."""

    op: str
    kind: StateKind = "attn_kv"
    tier: Tier = "device"
    block_hashes: tuple[int, ...] = ()


class BlockMapper:
    """Translate one engine instance's events into changes of our block hashes."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._nodes: dict[EngineHash, tuple] = {}  # plain tuples: a mapper of millions of blocks costs the GC nothing
        self._announced: dict[Key, set[int]] = {}
        self._group_kinds: dict[int | None, StateKind] = {}
        self.unmapped_blocks = 0
        self.skipped_blocks: Counter[str] = Counter()

    def reset(self) -> None:
        """Forget every engine block and every block announced (the index was told to drop them)."""
        self._nodes.clear()
        self._announced.clear()

    def held(self) -> dict[Key, list[int]]:
        """Our blocks announced and not evicted since the last reset, per state kind and tier."""
        return {key: sorted(hashes) for key, hashes in self._announced.items() if hashes}

    def apply(self, events: list[EngineEvent]) -> list[MappedChange]:
        """Our changes for one batch of engine events, in order."""
        out: list[MappedChange] = []
        for event in events:
            if isinstance(event, EngineBlockStored):
                out += self._stored(event)
            elif isinstance(event, EngineBlockRemoved):
                out += self._removed(event)
            elif isinstance(event, EngineAllCleared):
                self.reset()
                out.append(MappedChange("cleared"))
        return out

    def _node(self, engine_hash: EngineHash) -> _Node | None:
        raw = self._nodes.get(engine_hash)
        return None if raw is None else _Node(*raw)

    def _kind_of(self, kind: StateKind | None, group: int | None) -> StateKind:
        if kind is not None:
            self._group_kinds[group] = kind
            return kind
        return self._group_kinds.get(group, "attn_kv")

    def _stored(self, event: EngineBlockStored) -> list[MappedChange]:
        kind = self._kind_of(event.kind, event.group)
        key: Key = (kind, event.tier)
        bit = _KEY_BITS[key]
        size = event.block_size
        if event.skip == "remote":  # held by another node: neither ours nor this instance's
            self.skipped_blocks["remote"] += len(event.block_hashes)
            return []
        if len(event.token_ids) != len(event.block_hashes) * size:
            self.unmapped_blocks += len(event.block_hashes)  # e.g. a snapshot entry without its tokens
            return []
        parent = event.parent_block_hash
        if parent is None:
            our_parent, pending, foreign = ROOT_HASH, (), False
        elif parent in self._nodes:
            node = self._node(parent)
            our_parent, pending, foreign = node.our_parent, node.pending, node.foreign
        else:
            self.unmapped_blocks += len(event.block_hashes)
            return []
        announced = self._announced.setdefault(key, set())
        hashes = event.block_hashes
        plain = 0 if foreign or event.skip == "lora" else len(hashes) if event.keyed_from is None else event.keyed_from
        tokens = pending + tuple(event.token_ids[: plain * size])
        ours = block_hashes(tokens, self.block_size, our_parent).tolist() if len(tokens) >= self.block_size else []
        new: list[int] = []
        for i in range(plain):  # blocks named by their tokens alone: ours are computed from them
            engine_hash = hashes[i]
            done_before, done = (
                (len(pending) + i * size) // self.block_size,
                (len(pending) + (i + 1) * size) // self.block_size,
            )
            completed = ours[done_before:done]
            node = self._node(engine_hash)
            if node is None:
                rest = tokens[done * self.block_size : len(pending) + (i + 1) * size]
                node = _Node(
                    parent=parent,
                    our_parent=ours[done - 1] if done else our_parent,
                    pending=rest,
                    covers=tuple(completed),
                    crossed_boundary=bool(completed),
                    ends_at_boundary=bool(completed) and not rest,
                )
                if completed:
                    self._cover_ancestors(parent, completed[0])
            node = node._replace(present=node.present | bit)
            self._nodes[engine_hash] = tuple(node)
            for our in completed:
                if our in announced:
                    continue
                if kind == "linear_state":
                    if node.ends_at_boundary and our == completed[-1]:
                        announced.add(our)
                        new.append(our)
                elif self._all_present(engine_hash, our, bit):
                    announced.add(our)
                    new.append(our)
            parent = engine_hash
        reason = event.skip or ("extra_keys" if event.keyed_from is not None and not foreign else "foreign_parent")
        for engine_hash in hashes[plain:]:  # named by more than their tokens, or descending from such a block
            self.skipped_blocks[reason] += 1
            node = self._node(engine_hash) or _Node(parent=parent, our_parent=ROOT_HASH, pending=(), foreign=True)
            self._nodes[engine_hash] = tuple(node._replace(present=node.present | bit))
            parent = engine_hash
        return [MappedChange("stored", kind, event.tier, tuple(new))] if new else []

    def _cover_ancestors(self, parent: EngineHash | None, ours: int) -> None:
        """Record ``ours`` in the engine blocks before ``parent``'s boundary that it contains."""
        while parent is not None:
            node = self._node(parent)
            if node is None or not node.pending:
                return
            self._nodes[parent] = tuple(node._replace(covers=(*node.covers, ours)))
            if node.crossed_boundary:
                return
            parent = node.parent

    def _all_present(self, engine_hash: EngineHash, ours: int, bit: int) -> bool:
        """True if every engine block that makes up our block ``ours`` is present under the key ``bit``."""
        current: EngineHash | None = engine_hash
        while current is not None:
            node = self._node(current)
            if node is None or ours not in node.covers:
                return True
            if not node.present & bit:
                return False
            current = node.parent
        return True

    def _removed(self, event: EngineBlockRemoved) -> list[MappedChange]:
        if event.remote:
            return []
        kind = self._kind_of(event.kind, event.group)
        key: Key = (kind, event.tier)
        bit = _KEY_BITS[key]
        announced = self._announced.setdefault(key, set())
        gone: list[int] = []
        for engine_hash in event.block_hashes:
            node = self._node(engine_hash)
            if node is None:
                continue
            for ours in node.covers:
                if ours in announced:
                    announced.discard(ours)
                    gone.append(ours)
            if node.present & ~bit:
                self._nodes[engine_hash] = tuple(node._replace(present=node.present & ~bit))
            else:
                del self._nodes[engine_hash]
        return [MappedChange("evicted", kind, event.tier, tuple(gone))] if gone else []
