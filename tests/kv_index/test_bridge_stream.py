"""How the bridge cuts its changes into our batches: order kept, adjacent changes merged, each batch bounded."""

from __future__ import annotations

from libs.common.messages import AllBlocksCleared, BlocksEvicted, BlocksStored
from services.kv_index.block_mapper import MappedChange
from services.kv_index.bridge_stream import split_events
from services.kv_index.zmq_ingest import to_events


def test_adjacent_changes_of_one_kind_merge_and_order_is_kept():
    """Consecutive stores of one kind and tier become one event; an eviction or a clear in between is kept in place."""
    changes = [
        MappedChange("stored", "attn_kv", "device", (1, 2)),
        MappedChange("stored", "attn_kv", "device", (3,)),
        MappedChange("evicted", "attn_kv", "device", (1,)),
        MappedChange("stored", "attn_kv", "device", (4,)),
        MappedChange("cleared"),
        MappedChange("stored", "linear_state", "device", (5,)),
        MappedChange("stored", "attn_kv", "host", (6,)),
    ]
    assert to_events(changes) == [
        BlocksStored(block_hashes=[1, 2, 3]),
        BlocksEvicted(block_hashes=[1]),
        BlocksStored(block_hashes=[4]),
        AllBlocksCleared(),
        BlocksStored(block_hashes=[5], kind="linear_state"),
        BlocksStored(block_hashes=[6], tier="host"),
    ]


def test_large_event_lists_split_into_bounded_batches_in_order():
    """No batch carries more than the bound; concatenating the batches gives the original sequence back."""
    events = [
        AllBlocksCleared(),
        BlocksStored(block_hashes=list(range(10))),
        BlocksEvicted(block_hashes=[3, 4]),
        BlocksStored(block_hashes=[20]),
    ]
    chunks = split_events(events, max_hashes=4)
    assert all(sum(len(getattr(e, "block_hashes", ())) for e in chunk) <= 4 for chunk in chunks)
    assert isinstance(chunks[0][0], AllBlocksCleared)
    flat = [(type(e).__name__, h) for chunk in chunks for e in chunk for h in getattr(e, "block_hashes", [None])]
    expected = [(type(e).__name__, h) for e in events for h in getattr(e, "block_hashes", [None])]
    assert flat == expected
