"""Decode the KV events that vLLM and SGLang publish on ZMQ, in every encoding they have released.

A PUB message is ``[topic, seq (8-byte big-endian), payload]``; a replay answer is the same after
the DEALER's empty delimiter, with or without the topic frame, and ends with seq -1. The payload is
msgpack of an ``EventBatch``: ``[ts, [events], dp_rank?]`` (or the same keyed). An event is a tagged
array, fields in declaration order (``["BlockStored", hashes, parent, tokens, block_size, lora_id,
medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind, sliding_window]``; older releases
stop earlier, SGLang after ``lora_id``), or a map with a ``type`` key (newest releases: any order,
optional ``group_idx``, ``kv_cache_spec_kind``, ``extra_keys``, ``locality`` ...). Hashes are ints
or bytes (32-byte SHA-256 in current vLLM). Unknown fields and unknown event types are ignored; a
known event with wrongly typed fields raises ``BadRequest``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from libs.common.errors import BadRequest
from libs.common.messages import StateKind, Tier

EngineHash = int | bytes
END_OF_REPLAY = -1

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
_DEVICE_MEDIA = ("gpu", "cuda", "hbm", "device", "npu", "xpu")
_HOST_MEDIA = ("cpu", "dram", "host")
_LINEAR_SPEC_WORDS = ("mamba", "linear", "sliding", "swa", "local")
_decoder = msgspec.msgpack.Decoder()


@dataclass(frozen=True)
class EngineBlockStored:
    """Engine blocks stored: their hashes, parent, tokens, and where and how they are held."""

    block_hashes: list[EngineHash]
    parent_block_hash: EngineHash | None
    token_ids: list[int]
    block_size: int
    kind: StateKind | None  # None: not stated (older releases; known later from the group)
    group: int | None
    tier: Tier
    skip: str = ""  # why no block of this event can be ours: "lora" or "remote"
    keyed_from: int | None = None  # first block whose hash also covers extra keys (images, salt)


@dataclass(frozen=True)
class EngineBlockRemoved:
    """Engine blocks removed from one tier of one group."""

    block_hashes: list[EngineHash]
    kind: StateKind | None
    group: int | None
    tier: Tier
    remote: bool = False


@dataclass(frozen=True)
class EngineAllCleared:
    """The engine dropped its whole cache."""


EngineEvent = EngineBlockStored | EngineBlockRemoved | EngineAllCleared


@dataclass(frozen=True)
class EngineBatch:
    """One decoded event batch: its timestamp, its events, and how many events were of unknown types."""

    ts: float
    events: list[EngineEvent]
    ignored_events: int = 0


def _int(value: Any, what: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be an int, got {type(value).__name__}")
    return value


def _str(value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    return value


def _tier(medium: Any) -> Tier:
    text = (_str(medium, "medium") or "gpu").lower()
    if text in _DEVICE_MEDIA:
        return "device"
    return "host" if text in _HOST_MEDIA else "disk"


def _kind(spec_kind: Any) -> StateKind | None:
    text = _str(spec_kind, "kv_cache_spec_kind")
    if text is None:
        return None
    return "linear_state" if any(word in text.lower() for word in _LINEAR_SPEC_WORDS) else "attn_kv"


def _remote(locality: Any) -> bool:
    return (_str(locality, "locality") or "").lower() == "remote"


def _hash(value: Any, what: str) -> EngineHash:
    if isinstance(value, bool) or not isinstance(value, int | bytes):
        raise BadRequest(f"{what} must be an int or bytes, got {type(value).__name__}")
    return value


def _hashes(value: Any) -> list[EngineHash]:
    if not isinstance(value, list):
        raise BadRequest("block_hashes must be a list")
    return [_hash(h, "block hash") for h in value]


def _keyed_from(extra_keys: Any, blocks: int) -> int | None:
    """Index of the first block whose engine hash covers more than its tokens (None: none does)."""
    if extra_keys is None:
        return None
    if not isinstance(extra_keys, list):
        raise BadRequest("extra_keys must be a list or null")
    for i, keys in enumerate(extra_keys[:blocks]):
        if keys:
            return i
    return None


def _fields(raw: list | dict, names: tuple[str, ...]) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    return dict(zip(names, raw[1:], strict=False))


def _stored(f: dict[str, Any]) -> EngineBlockStored:
    hashes = _hashes(f.get("block_hashes"))
    tokens = f.get("token_ids")
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens
    ):
        raise BadRequest("token_ids must be a list of non-negative ints")
    block_size = _int(f.get("block_size"), "block_size")
    if block_size <= 0:
        raise BadRequest(f"block_size must be positive, got {block_size}")
    parent = f.get("parent_block_hash")
    lora_id = _int(f.get("lora_id"), "lora_id", optional=True)
    lora_name = _str(f.get("lora_name"), "lora_name")
    skip = "lora" if lora_id is not None or lora_name is not None else "remote" if _remote(f.get("locality")) else ""
    return EngineBlockStored(
        block_hashes=hashes,
        parent_block_hash=None if parent is None else _hash(parent, "parent_block_hash"),
        token_ids=tokens,
        block_size=block_size,
        kind=_kind(f.get("kv_cache_spec_kind")),
        group=_int(f.get("group_idx"), "group_idx", optional=True),
        tier=_tier(f.get("medium")),
        skip=skip,
        keyed_from=_keyed_from(f.get("extra_keys"), len(hashes)),
    )


def _removed(f: dict[str, Any]) -> EngineBlockRemoved:
    return EngineBlockRemoved(
        block_hashes=_hashes(f.get("block_hashes")),
        kind=_kind(f.get("kv_cache_spec_kind")),
        group=_int(f.get("group_idx"), "group_idx", optional=True),
        tier=_tier(f.get("medium")),
        remote=_remote(f.get("locality")),
    )


def _event(raw: Any) -> EngineEvent | None:
    """The typed event, or None for an event type this bridge does not know."""
    if isinstance(raw, list) and raw:
        tag = raw[0]
    elif isinstance(raw, dict):
        tag = raw.get("type")
    else:
        raise BadRequest(f"event must be a tagged array or a map, got {type(raw).__name__}")
    if not isinstance(tag, str):
        raise BadRequest("event without a string type tag")
    if tag == "BlockStored":
        return _stored(_fields(raw, _STORED_FIELDS))
    if tag == "BlockRemoved":
        return _removed(_fields(raw, _REMOVED_FIELDS))
    if tag == "AllBlocksCleared":
        return EngineAllCleared()
    return None


def decode_payload(payload: bytes) -> EngineBatch:
    """Decode an ``EventBatch`` payload in any released encoding."""
    try:
        raw = _decoder.decode(payload)
    except msgspec.DecodeError as e:
        raise BadRequest(f"payload is not msgpack: {e}") from None
    if isinstance(raw, list) and len(raw) >= 2:
        ts, events = raw[0], raw[1]
    elif isinstance(raw, dict):
        ts, events = raw.get("ts"), raw.get("events")
    else:
        raise BadRequest("EventBatch must be [ts, events, ...] or a map")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not isinstance(events, list):
        raise BadRequest("EventBatch needs a numeric ts and a list of events")
    decoded = [_event(e) for e in events]
    known = [e for e in decoded if e is not None]
    return EngineBatch(ts=float(ts), events=known, ignored_events=len(decoded) - len(known))


def _seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise BadRequest(f"sequence frame must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


def split_pub_frames(frames: list[bytes]) -> tuple[int, bytes]:
    """``(seq, payload)`` of a PUB message ``[topic, seq, payload]``."""
    if len(frames) != 3:
        raise BadRequest(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    seq = _seq(frames[1])
    if seq < 0:
        raise BadRequest(f"sequence number must not be negative, got {seq}")
    return seq, frames[2]


def split_replay_frames(frames: list[bytes]) -> tuple[int, bytes]:
    """``(seq, payload)`` of a replay answer ``[b"", topic?, seq, payload]``; seq -1 ends the replay."""
    if frames and frames[0] == b"":
        frames = frames[1:]
    if len(frames) == 3:
        frames = frames[1:]
    if len(frames) != 2:
        raise BadRequest(f"expected a replay answer [topic?, seq, payload], got {len(frames)} frames")
    seq = _seq(frames[0])
    if seq < END_OF_REPLAY:
        raise BadRequest(f"replayed sequence number must not be negative, got {seq}")
    return seq, frames[1]
