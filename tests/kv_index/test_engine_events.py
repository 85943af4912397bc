"""Engine (vLLM/SGLang) KV events: every released encoding decodes, blocks map onto ours, garbage is refused."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.common.errors import BadRequest
from libs.common.hashing import hash_list
from libs.lab.vllm_wire import FAMILIES, frames
from services.kv_index.block_mapper import BlockMapper
from services.kv_index.engine_events import (
    END_OF_REPLAY,
    EngineAllCleared,
    EngineBlockRemoved,
    EngineBlockStored,
    decode_payload,
    split_pub_frames,
    split_replay_frames,
)

TOKENS = list(range(500, 500 + 64 * 4))  # four of our 64-token blocks
OURS = hash_list(TOKENS, 64)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_released_encoding_decodes(name):
    """Stored, removed and cleared events decode the same from every release's encoding."""
    family = FAMILIES[name]
    ids = family.chain(TOKENS[:32], 16)
    payload = family.batch(1.5, [family.stored(ids, None, TOKENS[:32], 16), family.removed(ids[1:]), family.cleared()])
    batch = decode_payload(payload)
    stored, removed, cleared = batch.events
    assert batch.ts == 1.5 and batch.ignored_events == 0
    assert isinstance(stored, EngineBlockStored) and stored.block_hashes == ids and stored.token_ids == TOKENS[:32]
    assert stored.block_size == 16 and stored.tier == "device" and stored.parent_block_hash is None
    assert isinstance(removed, EngineBlockRemoved) and removed.block_hashes == ids[1:] and removed.tier == "device"
    assert isinstance(cleared, EngineAllCleared)
    assert all(isinstance(h, bytes) and len(h) == 32 for h in ids) == family.bytes_hashes


def test_map_events_carry_groups_tiers_and_what_is_not_ours():
    """Group, kind, medium, LoRA name, extra keys and locality are read; future fields and event types are ignored."""
    family = FAMILIES["vllm-map-events"]
    ids = family.chain(TOKENS[:64], 16)
    payload = family.batch(
        2.0,
        [
            family.stored(ids, None, TOKENS[:64], 16, group_idx=1, kind="mamba", medium="CPU"),
            family.stored(ids, None, TOKENS[:64], 16, lora_name="adapter"),
            family.stored(ids, None, TOKENS[:64], 16, extra_keys=[None, None, ["img-1", 0], None]),
            family.stored(ids, None, TOKENS[:64], 16, locality="REMOTE", medium="STORAGE"),
            family.removed(ids[:1], group_idx=1),
            family.future_event(ids[:1]),
        ],
    )
    batch = decode_payload(payload)
    linear, lora, keyed, remote, removed = batch.events
    assert (linear.kind, linear.group, linear.tier, linear.skip) == ("linear_state", 1, "host", "")
    assert lora.skip == "lora" and keyed.keyed_from == 2 and (remote.skip, remote.tier) == ("remote", "disk")
    assert (removed.kind, removed.group) == (None, 1)
    assert batch.ignored_events == 1


def test_a_keyed_batch_envelope_decodes():
    """A batch encoded as a map (``ts``, ``events``) decodes like the positional one."""
    family = FAMILIES["vllm-map-events"]
    ids = family.chain(TOKENS[:16], 16)
    event = msgspec.msgpack.decode(family.batch(0.0, [family.stored(ids, None, TOKENS[:16], 16)]))[1][0]
    batch = decode_payload(msgspec.msgpack.encode({"ts": 3.0, "events": [event], "data_parallel_rank": 0}))
    assert batch.ts == 3.0 and batch.events[0].block_hashes == ids


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01",
        msgspec.msgpack.encode({"ts": "now", "events": []}),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1.5], None, [], 16]]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1, -2], 1]]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1], 0]]]),
        msgspec.msgpack.encode([1.0, [["BlockRemoved", "not a list"]]]),
        msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved", "block_hashes": [1], "group_idx": "one"}]]),
        msgspec.msgpack.encode([1.0, [{"type": 7}]]),
        msgspec.msgpack.encode([1.0, [42]]),
        msgspec.msgpack.encode([1.0, [["BlockStored", [1], None, [1], 1, None, 5]]]),  # medium must be a string
    ],
)
def test_malformed_payloads_raise_bad_request(payload):
    """Malformed batches and wrongly typed fields of known events raise BadRequest, never another exception."""
    with pytest.raises(BadRequest):
        decode_payload(payload)


def test_pub_frames_and_replay_answers_of_both_generations_split():
    """PUB messages are [topic, seq, payload]; replay answers come with or without the topic, ending at seq -1."""
    assert split_pub_frames(frames(7, b"p")) == (7, b"p")
    seq8 = (41).to_bytes(8, "big")
    end = (-1).to_bytes(8, "big", signed=True)
    assert split_replay_frames([b"", b"kv", seq8, b"p"]) == (41, b"p")
    assert split_replay_frames([b"", seq8, b"p"]) == (41, b"p")
    assert split_replay_frames([b"", b"", end, b""]) == (END_OF_REPLAY, b"")
    assert split_replay_frames([b"", end, b""]) == (END_OF_REPLAY, b"")
    for bad in ([b"t", b"1234567", b"p"], [b"t", end, b"p"], [b"only"], [b"a", b"b", b"c", b"d"]):
        with pytest.raises(BadRequest):
            split_pub_frames(bad)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_fuzzed_frames_only_ever_raise_bad_request(raw):
    """Random frames split and decode, or raise BadRequest."""
    for split in (split_pub_frames, split_replay_frames):
        try:
            decode_payload(split(raw)[1])
        except BadRequest:
            pass


any_msgpack = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=6),
    max_leaves=30,
)
event_tags = st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"])


@settings(max_examples=300)
@given(
    st.lists(
        st.one_of(any_msgpack, st.tuples(event_tags, any_msgpack, any_msgpack, any_msgpack).map(list)), max_size=4
    ),
    any_msgpack,
)
def test_fuzzed_event_shapes_decode_and_map_or_raise_bad_request(events, ts):
    """Any msgpack shape, including tagged events with odd fields, decodes and maps or raises BadRequest."""
    mapper = BlockMapper(64)
    for payload in (msgspec.msgpack.encode([1.0, events]), msgspec.msgpack.encode([ts, events])):
        try:
            mapper.apply(decode_payload(payload).events)
        except BadRequest:
            pass


def _store(mapper, hashes, parent, tokens, size, kind="attn_kv", group=None, **extra):
    return mapper.apply([EngineBlockStored(hashes, parent, tokens, size, kind, group, "device", **extra)])


def _chain(tokens, size):
    return FAMILIES["vllm-seven-fields"].chain(tokens, size)


@pytest.mark.parametrize("engine_block", [16, 32, 64, 128])
def test_engine_blocks_map_onto_our_blocks(engine_block):
    """Whatever the engine's block size, the stored blocks are our hashes of the same tokens."""
    mapper = BlockMapper(64)
    ids = _chain(TOKENS, engine_block)
    changes = []
    parent = None
    for i, h in enumerate(ids):  # one event per engine block, chained through parents
        changes += _store(mapper, [h], parent, TOKENS[i * engine_block : (i + 1) * engine_block], engine_block)
        parent = h
    assert [h for c in changes for h in c.block_hashes] == OURS


def test_evicting_an_engine_block_evicts_the_block_that_contains_it():
    """Removing the 6th 16-token engine block evicts our 2nd 64-token block only."""
    mapper = BlockMapper(64)
    ids = _chain(TOKENS, 16)
    _store(mapper, ids, None, TOKENS, 16)
    (change,) = mapper.apply([EngineBlockRemoved([ids[5]], "attn_kv", None, "device")])
    assert change.op == "evicted" and list(change.block_hashes) == [OURS[1]]
    assert mapper.held() == {("attn_kv", "device"): sorted([OURS[0], OURS[2], OURS[3]])}


def test_linear_checkpoints_only_at_our_block_boundaries():
    """A linear_state group block yields a checkpoint only where it ends on our boundary."""
    mapper = BlockMapper(64)
    ids = _chain(TOKENS, 16)
    _store(mapper, ids, None, TOKENS, 16)
    changes = _store(mapper, ids[:8], None, TOKENS[:128], 16, kind="linear_state")
    assert [(c.kind, list(c.block_hashes)) for c in changes] == [("linear_state", OURS[:2])]


def test_a_removal_that_names_only_its_group_evicts_that_groups_state_kind():
    """Current vLLM removals carry group_idx but no kind: the kind learned from the group's stores is evicted."""
    mapper = BlockMapper(64)
    attn, linear = _chain(TOKENS, 16), _chain(TOKENS, 64)
    _store(mapper, attn, None, TOKENS, 16, group=0)
    _store(mapper, linear, None, TOKENS, 64, kind="linear_state", group=1)
    (change,) = mapper.apply([EngineBlockRemoved([linear[3]], None, 1, "device")])
    assert (change.kind, list(change.block_hashes)) == ("linear_state", [OURS[3]])
    assert mapper.held()[("attn_kv", "device")] == sorted(OURS)


def test_blocks_named_by_more_than_tokens_and_their_descendants_are_skipped():
    """LoRA blocks and blocks with extra keys (images, salt) are not ours, nor anything chained after them."""
    mapper = BlockMapper(64)
    ids = _chain(TOKENS, 16)
    changes = _store(mapper, ids[:8], None, TOKENS[:128], 16, keyed_from=4)
    assert [h for c in changes for h in c.block_hashes] == OURS[:1]
    assert _store(mapper, ids[8:], ids[7], TOKENS[128:], 16) == []  # children of a keyed block
    assert mapper.skipped_blocks == {"extra_keys": 4, "foreign_parent": 8}
    lora = BlockMapper(64)
    assert _store(lora, ids, None, TOKENS, 16, skip="lora") == [] and lora.skipped_blocks["lora"] == 16


def test_unknown_parent_or_missing_tokens_are_counted_not_guessed():
    """A block whose parent the mapper never saw, or whose tokens are missing, is not mapped (and is counted)."""
    mapper = BlockMapper(64)
    assert _store(mapper, [b"x"], b"never-seen", TOKENS[:64], 64) == []
    assert _store(mapper, [b"y", b"z"], None, [], 16) == []
    assert mapper.unmapped_blocks == 3


def test_reset_forgets_what_was_announced():
    """After a reset the same blocks are announced again (the index dropped them)."""
    mapper = BlockMapper(64)
    ids = _chain(TOKENS, 64)
    _store(mapper, ids, None, TOKENS, 64)
    mapper.reset()
    assert mapper.held() == {}
    assert [h for c in _store(mapper, ids, None, TOKENS, 64) for h in c.block_hashes] == OURS
