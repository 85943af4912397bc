"""The KV event wire format vLLM and SGLang publish, re-declared for tests (both encodings)."""

from __future__ import annotations

from typing import Any

import msgspec


class _EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(_KVCacheEvent):
    """Positional ``["BlockStored", hashes, parent, tokens, block_size, lora_id, medium]``."""

    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class BlockRemoved(_KVCacheEvent):
    """Positional ``["BlockRemoved", hashes, medium]``."""

    block_hashes: list[int | bytes]
    medium: str | None


class AllBlocksCleared(_KVCacheEvent):
    """Positional ``["AllBlocksCleared"]``."""


def positional(ts: float, events: list[_KVCacheEvent]) -> bytes:
    """An ``EventBatch`` the way older releases encode it (arrays, tag first)."""
    return msgspec.msgpack.encode(_EventBatch(ts=ts, events=events))


def keyed(ts: float, events: list[dict]) -> bytes:
    """An ``EventBatch`` the way newer releases may encode it (maps with a ``type`` field)."""
    return msgspec.msgpack.encode({"ts": ts, "events": events, "data_parallel_rank": None})


def frames(seq: int, payload: bytes) -> list[bytes]:
    """The 3-frame ZMQ message ``[topic, seq, payload]``."""
    return [b"kv-events", seq.to_bytes(8, "big"), payload]


def chain(tokens: list[int], block_size: int, salt: bytes = b"e") -> list[bytes]:
    """Engine-side block hashes for a prompt (any unique ids will do: ours are re-derived)."""
    return [salt + i.to_bytes(4, "big") for i in range(len(tokens) // block_size)]


def keyed_stored(hashes: list[Any], parent: Any, tokens: list[int], block_size: int, **extra: Any) -> dict:
    """A keyed ``BlockStored`` event."""
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": block_size, "lora_id": None, "medium": "GPU", **extra}
