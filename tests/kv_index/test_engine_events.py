"""Engine (vLLM/SGLang) KV events: both encodings decode, blocks map onto ours, garbage is refused."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.errors import BadRequest
from libs.common.hashing import hash_list
from services.kv_index.block_mapper import BlockMapper
from services.kv_index.engine_events import EngineAllCleared, EngineBlockRemoved, EngineBlockStored, decode_frames
from tests.kv_index import vllm_wire as w

TOKENS = list(range(500, 500 + 64 * 4))  # four of our 64-token blocks
OURS = hash_list(TOKENS, 64)


def test_positional_encoding_decodes():
    """Older array-like batches with int hashes decode into typed events."""
    payload = w.positional(1.5, [w.BlockStored([11, 12], None, TOKENS[:32], 16, None, "GPU"), w.BlockRemoved([12], "CPU"), w.AllBlocksCleared()])
    batch = decode_frames(w.frames(7, payload))
    assert batch.seq == 7 and batch.ts == 1.5
    stored, removed, cleared = batch.events
    assert isinstance(stored, EngineBlockStored) and stored.block_hashes == [11, 12] and stored.tier == "device"
    assert isinstance(removed, EngineBlockRemoved) and removed.tier == "host"
    assert isinstance(cleared, EngineAllCleared)


def test_keyed_encoding_with_bytes_hashes_and_hybrid_groups_decodes():
    """Newer keyed batches with bytes hashes decode; a mamba/sliding group is linear_state."""
    payload = w.keyed(2.0, [
        w.keyed_stored([b"a", b"b"], None, TOKENS[:32], 16),
        w.keyed_stored([b"a"], None, TOKENS[:16], 16, group_idx=1, kv_cache_spec_kind="mamba"),
        {"type": "BlockRemoved", "block_hashes": [b"b"], "medium": None},
    ])
    stored, linear, removed = decode_frames(w.frames(0, payload)).events
    assert stored.block_hashes == [b"a", b"b"] and stored.kind == "attn_kv"
    assert linear.kind == "linear_state"
    assert removed.tier == "device"


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01",
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1, 2, 3], 16, None, "GPU"]]]),  # tokens do not fill the block
        msgspec.msgpack.encode([1.0, [["Mystery", 1]]]),
        msgspec.msgpack.encode({"ts": "now", "events": []}),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1.5], None, [], 16]]]),
    ],
)
def test_malformed_payloads_raise_bad_request(payload):
    """Malformed or inconsistent batches raise BadRequest, never another exception."""
    with pytest.raises(BadRequest):
        decode_frames(w.frames(1, payload))


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_fuzzed_frames_only_ever_raise_bad_request(frames):
    """Random frames either decode or raise BadRequest."""
    try:
        decode_frames(frames)
    except BadRequest:
        pass


any_msgpack = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300)
@given(any_msgpack)
def test_fuzzed_valid_msgpack_only_ever_raises_bad_request(value):
    """Well-formed msgpack of any odd shape either decodes or raises BadRequest."""
    try:
        decode_frames(w.frames(1, msgspec.msgpack.encode(value)))
    except BadRequest:
        pass


def _store(mapper, hashes, parent, tokens, size, kind="attn_kv"):
    return mapper.apply([EngineBlockStored(hashes, parent, tokens, size, kind, "device", None)])


@pytest.mark.parametrize("engine_block", [16, 32, 64, 128])
def test_engine_blocks_map_onto_our_blocks(engine_block):
    """Whatever the engine's block size, the stored blocks are our hashes of the same tokens."""
    mapper = BlockMapper(64)
    ids = w.chain(TOKENS, engine_block)
    changes = []
    parent = None
    for i, h in enumerate(ids):  # one event per engine block, chained through parents
        changes += _store(mapper, [h], parent, TOKENS[i * engine_block : (i + 1) * engine_block], engine_block)
        parent = h
    assert [h for c in changes for h in c.block_hashes] == OURS


def test_evicting_an_engine_block_evicts_the_block_that_contains_it():
    """Removing the 6th 16-token engine block evicts our 2nd 64-token block only."""
    mapper = BlockMapper(64)
    ids = w.chain(TOKENS, 16)
    _store(mapper, ids, None, TOKENS, 16)
    (change,) = mapper.apply([EngineBlockRemoved([ids[5]], "attn_kv", "device")])
    assert change.op == "evicted" and list(change.block_hashes) == [OURS[1]]


def test_linear_checkpoints_only_at_our_block_boundaries():
    """A linear_state group block yields a checkpoint only where it ends on our boundary."""
    mapper = BlockMapper(64)
    ids = w.chain(TOKENS, 16)
    _store(mapper, ids, None, TOKENS, 16)
    changes = _store(mapper, ids[:8], None, TOKENS[:128], 16, kind="linear_state")
    assert [(c.kind, list(c.block_hashes)) for c in changes] == [("linear_state", OURS[:2])]


def test_unknown_parent_is_counted_not_guessed():
    """A block whose parent the mapper never saw is not mapped (and is counted)."""
    mapper = BlockMapper(64)
    assert _store(mapper, [b"x"], b"never-seen", TOKENS[:64], 64) == []
    assert mapper.unmapped_blocks == 1
