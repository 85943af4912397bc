"""Decode the KV events that vLLM and SGLang publish on ZMQ (both wire encodings).

A ZMQ message is ``[topic, seq (8-byte big-endian), payload]``; the payload is msgpack of an
``EventBatch``: positional ``[ts, [events], dp_rank?]`` (older releases) or keyed
``{"ts", "events", "data_parallel_rank"}``. Each event is positional with its tag first
(``["BlockStored", hashes, parent, tokens, block_size, lora_id, medium, ...]``) or a map with a
``type`` field. Block hashes are ints or bytes. Anything else raises ``BadRequest``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from libs.common.errors import BadRequest
from libs.common.messages import StateKind, Tier

EngineHash = int | bytes

_STORED_FIELDS = (
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
)
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")
_TIERS: dict[str, Tier] = {"gpu": "device", "cuda": "device", "cpu": "host", "disk": "disk"}
_LINEAR_SPEC_WORDS = ("mamba", "linear", "sliding", "swa", "local")


@dataclass(frozen=True)
class EngineBlockStored:
    """Engine blocks stored (engine hashes, their parent, the tokens they hold)."""

    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    kind: StateKind
    tier: Tier
    lora_id: int | None


@dataclass(frozen=True)
class EngineBlockRemoved:
    """Engine blocks removed from one tier and state kind."""

    block_hashes: list[EngineHash]
    kind: StateKind
    tier: Tier


@dataclass(frozen=True)
class EngineAllCleared:
    """The engine dropped its whole cache."""


EngineEvent = EngineBlockStored | EngineBlockRemoved | EngineAllCleared


@dataclass(frozen=True)
class EngineBatch:
    """One decoded ZMQ message: its sequence number, timestamp and events."""

    seq: int
    ts: float
    events: list[EngineEvent]


def _tier(medium: Any) -> Tier:
    if medium is None:
        return "device"
    if not isinstance(medium, str):
        raise BadRequest(f"medium must be a string, got {type(medium).__name__}")
    return _TIERS.get(medium.lower(), "disk")


def _kind(spec_kind: Any) -> StateKind:
    if spec_kind is None:
        return "attn_kv"
    text = str(spec_kind).lower()
    return "linear_state" if any(word in text for word in _LINEAR_SPEC_WORDS) else "attn_kv"


def _hash(value: Any, what: str) -> EngineHash:
    if isinstance(value, bool) or not isinstance(value, int | bytes):
        raise BadRequest(f"{what} must be an int or bytes, got {type(value).__name__}")
    return value


def _hashes(value: Any) -> list[EngineHash]:
    if not isinstance(value, list):
        raise BadRequest("block_hashes must be a list")
    return [_hash(h, "block hash") for h in value]


def _fields(raw: Any, names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """(tag, fields) of a positional or keyed event."""
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag, values = raw[0], raw[1:]
        if tag == "AllBlocksCleared":
            return tag, {}
        return tag, dict(zip(names, values, strict=False))
    if isinstance(raw, dict):
        tag = raw.get("type", raw.get("tag"))
        if not isinstance(tag, str):
            raise BadRequest("keyed event without a string 'type'")
        return tag, raw
    raise BadRequest(f"event must be a tagged array or a map, got {type(raw).__name__}")


def _event(raw: Any) -> EngineEvent:
    tag = raw[0] if isinstance(raw, list) and raw else raw.get("type") if isinstance(raw, dict) else None
    if tag == "BlockStored":
        _, f = _fields(raw, _STORED_FIELDS)
        tokens = f.get("token_ids")
        block_size = f.get("block_size")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise BadRequest("token_ids must be a list of non-negative ints")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
            raise BadRequest("block_size must be a positive int")
        hashes = _hashes(f.get("block_hashes"))
        if len(tokens) != len(hashes) * block_size:
            raise BadRequest(f"{len(tokens)} token_ids do not fill {len(hashes)} blocks of {block_size}")
        parent = f.get("parent_block_hash")
        lora = f.get("lora_id")
        return EngineBlockStored(
            block_hashes=hashes,
            parent_block_hash=None if parent is None else _hash(parent, "parent_block_hash"),
            token_ids=tokens,
            block_size=block_size,
            kind=_kind(f.get("kv_cache_spec_kind")),
            tier=_tier(f.get("medium")),
            lora_id=lora if isinstance(lora, int) and not isinstance(lora, bool) else None,
        )
    if tag == "BlockRemoved":
        _, f = _fields(raw, _REMOVED_FIELDS)
        return EngineBlockRemoved(
            block_hashes=_hashes(f.get("block_hashes")),
            kind=_kind(f.get("kv_cache_spec_kind")),
            tier=_tier(f.get("medium")),
        )
    if tag == "AllBlocksCleared":
        return EngineAllCleared()
    raise BadRequest(f"unknown event type {tag!r}")


def decode_payload(payload: bytes) -> tuple[float, list[EngineEvent]]:
    """Decode an ``EventBatch`` payload in either encoding."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as e:
        raise BadRequest(f"payload is not msgpack: {e}") from e
    if isinstance(raw, list) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
    elif isinstance(raw, dict):
        ts, events = raw.get("ts"), raw.get("events")
    else:
        raise BadRequest("EventBatch must be [ts, events, ...] or a map")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not isinstance(events, list):
        raise BadRequest("EventBatch needs a numeric ts and a list of events")
    return float(ts), [_event(e) for e in events]


def decode_frames(frames: list[bytes]) -> EngineBatch:
    """Decode a ZMQ multipart message ``[topic, seq, payload]``."""
    if len(frames) != 3:
        raise BadRequest(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    _topic, seq_frame, payload = frames
    if len(seq_frame) != 8:
        raise BadRequest(f"sequence frame must be 8 bytes, got {len(seq_frame)}")
    ts, events = decode_payload(payload)
    return EngineBatch(seq=int.from_bytes(seq_frame, "big"), ts=ts, events=events)
