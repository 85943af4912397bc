"""The Redis data model of the KV index: which instance holds which block, per state kind.

Keys (all under a configurable prefix ``P``):
- ``P b:attn`` / ``P b:lin``: one hash per state kind; field = block hash (8 bytes, little
  endian), value = the holders as ``,<slot>:<tier bits>,`` tokens (device 1, host 2, disk 4), so
  one ``HMGET`` answers "who holds these blocks" for a whole prompt.
- ``P own:<slot>:attn`` / ``P own:<slot>:lin``: the blocks each instance holds (to clear it).
- ``P slots`` (``site/instance`` -> slot), ``P slot_seq``, ``P inst:<slot>`` (site, instance,
  last_seq, stale, gaps), ``P alive`` (sorted set: slot -> heartbeat expiry, unix seconds).
- ``P generation``: set once the store is initialised; missing means Redis lost its data.
Updates and lookups run as Lua scripts (``lua/``), so each is atomic and one round trip.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import redis.asyncio as aioredis

from libs.common.messages import StateKind, Tier

_LUA = Path(__file__).with_name("lua")
KIND_CODE: dict[StateKind, str] = {"attn_kv": "attn", "linear_state": "lin"}
TIER_BIT: dict[Tier, int] = {"device": 1, "host": 2, "disk": 4}

_ALLOCATE = """
local s = redis.call('HGET', KEYS[1], ARGV[1])
if s then return tonumber(s) end
s = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], s)
redis.call('HSET', KEYS[3] .. s, 'site', ARGV[2], 'instance', ARGV[3], 'last_seq', 0, 'stale', 0, 'gaps', 0)
return s
"""


def _script(name: str) -> str:
    return (_LUA / "common.lua").read_text() + "\n" + (_LUA / f"{name}.lua").read_text()


def pack_hashes(hashes: list[int] | np.ndarray) -> bytes:
    """Block hashes as consecutive 8-byte little-endian fields."""
    return np.asarray(hashes, dtype=np.uint64).astype("<u8", copy=False).tobytes()


@dataclass(frozen=True)
class Op:
    """One change inside a batch: ``S`` stored, ``E`` evicted (of a kind and tier), ``C`` cleared."""

    op: str
    kind: StateKind = "attn_kv"
    tier: Tier = "device"
    hashes: bytes = b""


@dataclass(frozen=True)
class SlotPrefix:
    """Lookup result of one instance slot, in blocks."""

    slot: int
    attn_kv_blocks: int
    linear_state_blocks: int
    usable_blocks: int


class RedisKvStore:
    """Atomic updates and lookups of the KV index in Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str = "prfaas:kv:") -> None:
        self.r = client
        self.p = prefix
        self._apply = client.register_script(_script("apply"))
        self._lookup = client.register_script(_script("lookup"))
        self._forget = client.register_script(_script("forget"))
        self._allocate = client.register_script(_ALLOCATE)
        self._slots: dict[str, int] = {}
        self._names: dict[int, tuple[str, str]] = {}

    async def ensure_generation(self) -> bool:
        """Mark the store initialised; True if it was empty (never used, or Redis lost its data)."""
        created = await self.r.set(self.p + "generation", str(time.time()), nx=True)
        if created:
            self._slots.clear()
            self._names.clear()
        return bool(created)

    async def slot_for(self, site: str, instance: str) -> int:
        """The instance's slot number, allocated on first sight."""
        key = f"{site}/{instance}"
        slot = self._slots.get(key)
        if slot is None:
            slot = int(
                await self._allocate(
                    keys=[self.p + "slots", self.p + "slot_seq", self.p + "inst:"], args=[key, site, instance]
                )
            )
            self._slots[key] = slot
            self._names[slot] = (site, instance)
        return slot

    async def names(self, slots: list[int]) -> dict[int, tuple[str, str]]:
        """``slot -> (site, instance)`` for the given slots."""
        missing = [s for s in slots if s not in self._names]
        if missing:
            for key, slot in (await self.r.hgetall(self.p + "slots")).items():
                site, instance = key.decode().split("/", 1)
                self._names[int(slot)] = (site, instance)
                self._slots[key.decode()] = int(slot)
        return {s: self._names[s] for s in slots if s in self._names}

    async def last_seq(self, slot: int) -> int:
        """The sequence number of the slot's last applied batch (0: none yet)."""
        return int(await self.r.hget(f"{self.p}inst:{slot}", "last_seq") or 0)

    async def heartbeat(self, slot: int, expires_at_s: float) -> None:
        """Keep the slot in answers until ``expires_at_s`` (unix seconds)."""
        await self.r.zadd(self.p + "alive", {str(slot): expires_at_s})

    async def apply(self, slot: int, seq: int, ops: list[Op], resets: bool) -> tuple[str, int]:
        """Apply one batch atomically; returns (status, last applied seq) — see ``lua/apply.lua``."""
        args: list[str | bytes | int] = [self.p, slot, seq, 1 if resets else 0]
        for op in ops:
            args += [op.op, KIND_CODE[op.kind], TIER_BIT[op.tier], op.hashes]
        status, last = await self._apply(args=args)
        return status.decode(), int(last)

    async def lookup(self, packed_hashes: bytes, now_s: float, hybrid: bool) -> list[SlotPrefix]:
        """Longest prefixes of live, non-stale instances for the packed block hashes."""
        raw = await self._lookup(args=[self.p, packed_hashes, repr(now_s), 1 if hybrid else 0])
        flat = [int(x) for x in raw.split(b",")] if raw else []
        return [SlotPrefix(*flat[i : i + 4]) for i in range(0, len(flat), 4)]

    async def forget_silent(self, cutoff_s: float) -> list[int]:
        """Drop the blocks of instances silent since before ``cutoff_s``; they turn stale."""
        return [int(s) for s in await self._forget(args=[self.p, repr(cutoff_s)])]
