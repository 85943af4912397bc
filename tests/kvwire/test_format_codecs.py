"""Format, codecs and reassembly without a network: random part sets round-trip through chunks."""

from __future__ import annotations

import random
import zlib

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libs.common.errors import BadRequest, TransferFailed
from libs.common.messages import KvChunk
from libs.common.state_parts import PartSpec, StatePart
from libs.kvwire.arena import Arena
from libs.kvwire.assembly import TransferAssembly, required_bytes
from libs.kvwire.format import CHECKSUMS, bitmap, build_manifest, unpack_bitmap
from libs.kvwire.sender import OutChunk, encode_part
from tests.kvwire.support import assert_restored

FLOATS = ("<f2", "<f4", "<f8")


@st.composite
def part_sets(draw):
    """Unique parts of random kind, dtype, shape and allowed codec, filled from a seed."""
    n = draw(st.integers(1, 6))
    keys = draw(
        st.lists(
            st.tuples(
                st.integers(0, 40),
                st.sampled_from(["attn_kv", "linear_state"]),
                st.sampled_from(["k", "v", "state", "ckpt.3"]),
            ),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    parts, codecs = [], []
    for layer, kind, name in keys:
        dtype = np.dtype(draw(st.sampled_from([*FLOATS, "<i4", "|u1"])))
        shape = tuple(draw(st.lists(st.integers(0, 48), min_size=0, max_size=3)))
        if dtype.kind == "f":
            array = (rng.standard_normal(shape) * draw(st.sampled_from([1e-3, 1.0, 300.0]))).astype(dtype)
        else:
            array = rng.integers(0, 100, size=shape).astype(dtype)
        allowed = ["raw", "zstd"] + (["int8"] if kind == "attn_kv" and dtype.kind == "f" else [])
        parts.append(StatePart(layer, kind, name, np.ascontiguousarray(array)))
        codecs.append(draw(st.sampled_from(allowed)))
    return parts, codecs


def _header(manifest, chunk: OutChunk, flip: bool = False) -> KvChunk:
    header = chunk.header(manifest.transfer_id, attempt=0)
    return msgspec.structs.replace(header, checksum=header.checksum ^ 1) if flip else header


def _assembly(manifest) -> tuple[TransferAssembly, Arena, list[bool]]:
    arena = Arena(required_bytes(manifest) + 4096)
    region = arena.allocate(required_bytes(manifest))
    released: list[bool] = []
    return TransferAssembly(manifest, arena, region, lambda: released.append(True)), arena, released


def _deliver(assembly: TransferAssembly, header: KvChunk, payload: memoryview) -> bool | None:
    target = assembly.target(header)
    if isinstance(target, bool):
        return None
    target[:] = payload
    return assembly.commit(header, target)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(part_sets(), st.sampled_from([4096, 8192, 65536]), st.sampled_from(sorted(CHECKSUMS)), st.randoms())
def test_random_parts_round_trip_through_shuffled_duplicated_chunks(drawn, chunk_bytes, algo, order: random.Random):
    """Any part set and codec survives chunking, any chunk order and duplicates: lossless exact, int8 in bound."""
    parts, codecs = drawn
    specs = [PartSpec.of(p, c) for p, c in zip(parts, codecs, strict=True)]
    manifest = build_manifest(
        transfer_id="t-prop",
        src_site="a",
        dst_site="b",
        model="m",
        block_size=64,
        num_tokens=7,
        specs=specs,
        chunk_bytes=chunk_bytes,
        checksum=algo,
    )
    encoded = [encode_part(i, p, manifest) for i, p in enumerate(parts)]
    chunks = [c for e in encoded for c in e.chunks(chunk_bytes)]
    deliveries = chunks + order.sample(chunks, k=min(3, len(chunks)))  # a few resent
    order.shuffle(deliveries)
    assembly, arena, _ = _assembly(manifest)
    digests = [e.digest for e in encoded]
    held: set[tuple[int, int]] = set()
    for i, chunk in enumerate(deliveries):
        if i == len(deliveries) // 2 and len(held) < len(chunks):
            assert assembly.finish(digests) is False  # never complete while a chunk is missing
        _deliver(assembly, _header(manifest, chunk), chunk.payload)
        held.add((chunk.part, chunk.offset))
    assert assembly.finish(digests)
    assert_restored(parts, assembly.parts(), codecs)
    assert assembly.duplicate_chunks == len(deliveries) - len(chunks)


def test_corrupt_chunk_is_rejected_then_accepted_when_resent():
    """A payload that fails its checksum is not held; the resent chunk completes the part."""
    part = StatePart(3, "attn_kv", "k", np.arange(5000, dtype=np.float32))
    manifest = build_manifest(
        transfer_id="t-bad",
        src_site="a",
        dst_site="b",
        model="m",
        block_size=64,
        num_tokens=1,
        specs=[PartSpec.of(part)],
        chunk_bytes=4096,
    )
    enc = encode_part(0, part, manifest)
    assembly, _, _ = _assembly(manifest)
    first, *rest = list(enc.chunks(4096))
    corrupted = bytearray(first.payload)
    corrupted[100] ^= 0x04
    assert _deliver(assembly, _header(manifest, first), memoryview(corrupted)) is False
    assert assembly.bad_chunks == 1
    for chunk in rest:
        assert _deliver(assembly, _header(manifest, chunk), chunk.payload) is True
    assert assembly.finish([enc.digest]) is False
    assert _deliver(assembly, _header(manifest, first), first.payload) is True
    assert assembly.finish([enc.digest]) is True
    assert assembly.parts()[0].array.tobytes() == part.array.tobytes()


def test_foreign_chunks_fail_the_part_digest():
    """Chunks checksummed by another sender (different data, same layout) fail the whole-part check."""
    old = StatePart(0, "linear_state", "state", np.zeros(3000, dtype=np.float32))
    new = StatePart(0, "linear_state", "state", np.ones(3000, dtype=np.float32))
    manifest = build_manifest(
        transfer_id="t-digest",
        src_site="a",
        dst_site="b",
        model="m",
        block_size=64,
        num_tokens=1,
        specs=[PartSpec.of(old)],
        chunk_bytes=4096,
    )
    stale, fresh = encode_part(0, old, manifest), encode_part(0, new, manifest)
    assembly, _, _ = _assembly(manifest)
    for chunk in stale.chunks(4096):
        _deliver(assembly, _header(manifest, chunk), chunk.payload)
    with pytest.raises(TransferFailed, match="digest"):
        assembly.finish([fresh.digest])


def test_lossy_codec_is_refused_for_linear_state_and_integers():
    """int8 is for attn_kv floats only: linear state and integer arrays are refused up front."""
    common = dict(transfer_id="t", src_site="a", dst_site="b", model="m", block_size=64, num_tokens=1)
    with pytest.raises(BadRequest, match="attn_kv only"):
        build_manifest(
            **common,
            specs=[PartSpec(layer=0, kind="linear_state", name="state", dtype="<f4", shape=(4, 4), codec="int8")],
        )
    with pytest.raises(BadRequest, match="float"):
        build_manifest(
            **common, specs=[PartSpec(layer=1, kind="attn_kv", name="k", dtype="<i4", shape=(4, 4), codec="int8")]
        )
    with pytest.raises(BadRequest, match="twice"):
        build_manifest(**common, specs=[PartSpec(layer=1, kind="attn_kv", name="k", dtype="<f2", shape=(4,))] * 2)


def test_chunk_outside_the_part_layout_is_a_bad_request():
    """A header whose offset or length does not match the part's layout is refused, nothing written."""
    part = StatePart(0, "attn_kv", "k", np.zeros(3000, dtype=np.float32))
    manifest = build_manifest(
        transfer_id="t-lay",
        src_site="a",
        dst_site="b",
        model="m",
        block_size=64,
        num_tokens=1,
        specs=[PartSpec.of(part)],
        chunk_bytes=4096,
    )
    assembly, _, _ = _assembly(manifest)
    with pytest.raises(BadRequest):
        assembly.target(
            KvChunk(transfer_id="t-lay", part=0, offset=100, length=4096, checksum=0, part_wire_bytes=12000)
        )
    with pytest.raises(BadRequest):
        assembly.target(KvChunk(transfer_id="t-lay", part=1, offset=0, length=4096, checksum=0, part_wire_bytes=12000))


@given(st.lists(st.booleans(), max_size=200))
def test_bitmap_round_trip(bits):
    """Held-chunk bitmaps decode to what was encoded (and pad missing bytes with 'not held')."""
    assert unpack_bitmap(bitmap(bits), len(bits)).tolist() == bits
    assert not unpack_bitmap(b"", len(bits)).any()


def test_arena_reuses_and_merges_freed_regions():
    """Freed regions merge with their neighbours, so the whole arena can be allocated again."""
    arena = Arena(1 << 20)
    regions = [arena.allocate(100_000) for _ in range(10)]
    assert all(regions) and arena.allocate(200_000) is None
    for region in regions[::2] + regions[1::2]:
        arena.free(region)
    assert arena.used_bytes == 0 and arena.largest_free_bytes == arena.capacity_bytes
    assert arena.allocate(arena.capacity_bytes) is not None


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=70_000), st.integers(min_value=0, max_value=2**32 - 1))
def test_fast_crc32_is_zlibs_crc32(data, start):
    """The ``crc32`` checksum gives zlib's values (a receiver without isal verifies what a sender with it sent)."""
    pytest.importorskip("isal")
    assert CHECKSUMS["crc32"](data, start) == zlib.crc32(data, start)
    assert CHECKSUMS["crc32"] is not zlib.crc32
