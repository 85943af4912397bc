"""The KV event wire formats vLLM and SGLang have released, re-declared the way they declare them.

Each family is a set of msgspec Structs with the options and field order of one generation of
``vllm/distributed/kv_events.py`` (or SGLang's copy of it), so encoding them gives the exact
bytes those engines put on the wire:

- ``sglang``: array-like events of five fields, integer hashes, ``BlockRemoved`` without medium.
- ``vllm-six-fields``: array-like events ending at ``medium``, integer hashes, batch with a rank.
- ``vllm-seven-fields``: array-like events with ``lora_name`` and the optional ``extra_keys``,
  ``group_idx``, ``kv_cache_spec_kind``, ``kv_cache_spec_sliding_window``; 32-byte hashes.
- ``vllm-map-events``: array-like batch, each event a map tagged ``type`` with the optional
  ``locality``, ``ownership``, ``lookahead_token_ids`` and a field no release has yet.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec

Hash = int | bytes


# --- sglang ---------------------------------------------------------------------------------
class _SglBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]


class _SglEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class _SglStored(_SglEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None


class _SglRemoved(_SglEvent, tag="BlockRemoved"):
    block_hashes: list[int]


class _SglCleared(_SglEvent, tag="AllBlocksCleared"):
    pass


# --- vllm, six fields -----------------------------------------------------------------------
class _Batch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class _SixEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class _SixStored(_SixEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class _SixRemoved(_SixEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class _SixCleared(_SixEvent, tag="AllBlocksCleared"):
    pass


# --- vllm, seven fields ---------------------------------------------------------------------
class _SevenEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class _SevenStored(_SevenEvent, tag="BlockStored"):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class _SevenRemoved(_SevenEvent, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None


class _SevenCleared(_SevenEvent, tag="AllBlocksCleared"):
    pass


# --- vllm, map events -----------------------------------------------------------------------
class _MapEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class _MapStored(_MapEvent, tag="BlockStored"):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    lookahead_token_ids: list[int] | None = None
    field_of_a_future_release: dict[str, int] | None = None


class _MapRemoved(_MapEvent, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class _MapCleared(_MapEvent, tag="AllBlocksCleared"):
    pass


class _MapFutureEvent(_MapEvent, tag="BlocksPinned"):
    block_hashes: list[bytes | int]


@dataclass(frozen=True)
class Family:
    """One released wire format: how it names blocks and encodes batches."""

    name: str
    bytes_hashes: bool
    replay_has_topic: bool  # current releases repeat the topic frame in replay answers

    def chain(self, tokens: list[int], block_size: int, parent: Hash | None = None, salt: bytes = b"") -> list[Hash]:
        """Engine hashes of consecutive blocks (each over its parent's hash and its tokens, as vLLM does)."""
        out: list[Hash] = []
        for i in range(len(tokens) // block_size):
            prev = b"" if parent is None else parent if isinstance(parent, bytes) else parent.to_bytes(8, "big")
            digest = hashlib.sha256(
                prev + salt + msgspec.msgpack.encode(tokens[i * block_size : (i + 1) * block_size])
            ).digest()
            parent = digest if self.bytes_hashes else int.from_bytes(digest[:8], "big")
            out.append(parent)
        return out

    def stored(
        self, hashes: list[Hash], parent: Hash | None, tokens: list[int], block_size: int, **opt: Any
    ) -> msgspec.Struct:
        """A ``BlockStored`` event (``opt``: medium, lora_name, extra_keys, group_idx, kind, locality ...)."""
        if self.name == "sglang":
            return _SglStored(hashes, parent, tokens, block_size, opt.get("lora_id"))
        if self.name == "vllm-six-fields":
            return _SixStored(hashes, parent, tokens, block_size, opt.get("lora_id"), opt.get("medium", "GPU"))
        common = dict(
            block_hashes=hashes,
            parent_block_hash=parent,
            token_ids=tokens,
            block_size=block_size,
            lora_id=opt.get("lora_id"),
            medium=opt.get("medium", "GPU"),
            lora_name=opt.get("lora_name"),
            extra_keys=opt.get("extra_keys"),
            group_idx=opt.get("group_idx"),
            kv_cache_spec_kind=opt.get("kind"),
            kv_cache_spec_sliding_window=opt.get("sliding_window"),
        )
        if self.name == "vllm-seven-fields":
            return _SevenStored(**common)
        return _MapStored(
            **common,
            locality=opt.get("locality"),
            ownership=opt.get("ownership"),
            lookahead_token_ids=opt.get("lookahead"),
            field_of_a_future_release={"x": 1},
        )

    def removed(self, hashes: list[Hash], **opt: Any) -> msgspec.Struct:
        """A ``BlockRemoved`` event (``opt``: medium, group_idx, locality)."""
        if self.name == "sglang":
            return _SglRemoved(hashes)
        if self.name == "vllm-six-fields":
            return _SixRemoved(hashes, opt.get("medium", "GPU"))
        if self.name == "vllm-seven-fields":
            return _SevenRemoved(hashes, opt.get("medium", "GPU"), opt.get("group_idx"))
        return _MapRemoved(hashes, opt.get("medium", "GPU"), opt.get("group_idx"), opt.get("locality"))

    def cleared(self) -> msgspec.Struct:
        """An ``AllBlocksCleared`` event."""
        return {"sglang": _SglCleared, "vllm-six-fields": _SixCleared, "vllm-seven-fields": _SevenCleared}.get(
            self.name, _MapCleared
        )()

    def future_event(self, hashes: list[Hash]) -> msgspec.Struct:
        """An event type no release has yet (only the map family can carry one)."""
        return _MapFutureEvent(hashes)

    def batch(self, ts: float, events: list[msgspec.Struct]) -> bytes:
        """The msgpack payload of one event batch."""
        if self.name == "sglang":
            return msgspec.msgpack.encode(_SglBatch(ts=ts, events=events))
        return msgspec.msgpack.encode(_Batch(ts=ts, events=events, data_parallel_rank=0))


FAMILIES = {
    f.name: f
    for f in (
        Family("sglang", bytes_hashes=False, replay_has_topic=False),
        Family("vllm-six-fields", bytes_hashes=False, replay_has_topic=False),
        Family("vllm-seven-fields", bytes_hashes=True, replay_has_topic=True),
        Family("vllm-map-events", bytes_hashes=True, replay_has_topic=True),
    )
}


def frames(seq: int, payload: bytes, topic: bytes = b"kv-events") -> list[bytes]:
    """The 3-frame PUB message ``[topic, seq, payload]``."""
    return [topic, seq.to_bytes(8, "big"), payload]
