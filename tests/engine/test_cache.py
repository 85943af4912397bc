"""The hybrid prefix-block cache: usable prefixes, LRU eviction and the KV events it reports."""

from __future__ import annotations

from libs.common.hashing import block_hash, hash_list
from libs.common.messages import AllBlocksCleared, BlocksEvicted, BlocksStored
from libs.engine.cache import PrefixCache


def _chain(seed: int, n: int) -> list[int]:
    return hash_list([seed] * 3 + list(range(n * 64 - 3)))


def _store_both(cache: PrefixCache, hashes: list[int], parent: int | None = None, size: int = 10) -> None:
    for kind in ("attn_kv", "linear_state"):
        cache.store(kind, hashes, [f"{kind}:{h}" for h in hashes], [size] * len(hashes), parent)


def test_usable_prefix_needs_all_kv_blocks_and_the_linear_checkpoint() -> None:
    """k blocks are usable when attn_kv 0..k-1 and linear_state k-1 are held (the hybrid rule)."""
    cache = PrefixCache(10_000)
    hashes = _chain(1, 5)
    cache.store("attn_kv", hashes[:4], [None] * 4, [1] * 4, None)
    cache.store("linear_state", [hashes[1]], [None], [1], hashes[0])
    assert cache.usable_blocks(hashes) == 2
    cache.store("linear_state", [hashes[3]], [None], [1], hashes[2])
    assert cache.usable_blocks(hashes) == 4
    assert cache.usable_blocks(_chain(2, 5)) == 0
    attn_only = PrefixCache(10_000, kinds=("attn_kv",))
    attn_only.store("attn_kv", hashes[:3], [None] * 3, [1] * 3, None)
    assert attn_only.usable_blocks(hashes) == 3


def test_take_prefix_returns_payloads_in_order() -> None:
    """take_prefix gives the attn_kv payloads of blocks 0..k-1 and the linear_state payload of block k-1."""
    cache = PrefixCache(10_000)
    hashes = _chain(1, 4)
    _store_both(cache, hashes)
    attn, linear = cache.take_prefix(hashes, 3)
    assert attn == [f"attn_kv:{h}" for h in hashes[:3]]
    assert linear == f"linear_state:{hashes[2]}"


def test_store_reports_new_blocks_with_their_parent() -> None:
    """Only newly held blocks are reported, as one chain per kind with the hash before them."""
    cache = PrefixCache(10_000)
    hashes = _chain(1, 6)
    _store_both(cache, hashes[:2])
    assert cache.drain_events() == [
        BlocksStored(block_hashes=hashes[:2], kind="attn_kv", parent_hash=None),
        BlocksStored(block_hashes=hashes[:2], kind="linear_state", parent_hash=None),
    ]
    _store_both(cache, hashes)
    assert cache.drain_events() == [
        BlocksStored(block_hashes=hashes[2:], kind="attn_kv", parent_hash=hashes[1]),
        BlocksStored(block_hashes=hashes[2:], kind="linear_state", parent_hash=hashes[1]),
    ]
    assert cache.drain_events() == []


def test_lru_evicts_least_recent_chain_tail_first() -> None:
    """Over capacity, the least recently used blocks go first; a chain loses its tail before its root."""
    cache = PrefixCache(capacity_bytes=120, kinds=("attn_kv",))
    a, b = _chain(1, 3), _chain(2, 3)
    cache.store("attn_kv", a, [None] * 3, [20] * 3, None)
    cache.store("attn_kv", b, [None] * 3, [20] * 3, None)
    cache.take_prefix(a, 1)  # a[0] is now the most recent block
    cache.drain_events()
    c = _chain(3, 1)
    cache.store("attn_kv", c, [None], [30], None)
    assert cache.used_bytes == 110
    assert cache.drain_events() == [
        BlocksStored(block_hashes=c, kind="attn_kv", parent_hash=None),
        BlocksEvicted(block_hashes=[a[2], a[1]], kind="attn_kv"),
    ]
    assert cache.holds("attn_kv", a[0]) and all(cache.holds("attn_kv", h) for h in b)


def test_blocks_that_do_not_fit_are_never_reported() -> None:
    """A chain longer than the capacity keeps its head; the tail is neither reported stored nor evicted."""
    cache = PrefixCache(capacity_bytes=50)
    hashes = _chain(1, 5)
    cache.store("attn_kv", hashes, [None] * 5, [20] * 5, None)
    assert cache.drain_events() == [BlocksStored(block_hashes=hashes[:2], kind="attn_kv", parent_hash=None)]


def test_snapshot_and_clear() -> None:
    """The snapshot lists every held chain (branches included); clear empties it and says so."""
    cache = PrefixCache(10_000)
    trunk = _chain(1, 3)
    branch = [block_hash(trunk[0], [7] * 64)]
    cache.store("attn_kv", trunk, [None] * 3, [1] * 3, None)
    cache.store("attn_kv", branch, [None], [1], trunk[0])
    snap = cache.snapshot()
    held = {h for s in snap.stored for h in s.block_hashes}
    assert held == {*trunk, *branch}
    for s in snap.stored:
        assert s.parent_hash is None or s.parent_hash in held
    cache.drain_events()
    cache.clear()
    assert len(cache) == 0 and cache.used_bytes == 0
    assert cache.drain_events() == [AllBlocksCleared()]


def test_pinned_blocks_survive_eviction_until_unpinned() -> None:
    """Eviction passes over pinned blocks (pins are counted); unpinned, they are evicted in LRU order."""
    cache = PrefixCache(30, kinds=("attn_kv",))
    held = _chain(1, 3)
    cache.store("attn_kv", held, [None] * 3, [10] * 3, None)
    assert cache.leading_blocks("attn_kv", held + _chain(2, 1)) == 3
    cache.pin("attn_kv", held[:2])
    cache.pin("attn_kv", held[:1])  # a second request on the same root block
    cache.drain_events()
    cache.store("attn_kv", _chain(3, 2), [None] * 2, [10] * 2, None)
    assert [cache.holds("attn_kv", h) for h in held] == [True, True, False]
    assert cache.drain_events()[-1] == BlocksEvicted(block_hashes=[held[2]], kind="attn_kv")
    cache.unpin("attn_kv", held[:2])
    cache.store("attn_kv", _chain(4, 1), [None], [10], None)
    assert [cache.holds("attn_kv", h) for h in held] == [True, False, False]  # held[0] is pinned once more
    cache.unpin("attn_kv", held[:1])
    cache.unpin("attn_kv", held[:1])  # more unpins than pins are harmless
    cache.store("attn_kv", _chain(5, 1), [None], [10], None)
    assert not cache.holds("attn_kv", held[0])
    assert cache.used_bytes == 30


def test_leading_blocks_of_a_kind_ignore_linear_checkpoints() -> None:
    """leading_blocks counts held blocks of one kind from the start, stopping at the first gap."""
    cache = PrefixCache(10_000)
    hashes = _chain(1, 4)
    cache.store("attn_kv", hashes[:3], [None] * 3, [1] * 3, None)
    assert cache.leading_blocks("attn_kv", hashes) == 3
    assert cache.leading_blocks("linear_state", hashes) == 0
    assert cache.usable_blocks(hashes) == 0
