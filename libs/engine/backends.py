"""What gateways wrap: one backend interface, and the reference model behind it (compute in threads).

A backend prefills layer by layer (an async iterator of each layer's ``StatePart`` list, the head
last), decodes with continuous batching (an async iterator of ``DecodeOutput``), and keeps a
prefix-block cache whose ``drain_events()`` the gateway publishes as KV events.

Between sites only the missing part of a prompt's ``attn_kv`` travels: with ``skip_blocks`` a
prefill emits K/V for tokens ``skip_blocks * block_size ..`` only (linear states, tokens and
logits are whole: a linear state is valid only at the prompt's exact end), and the decode side
``restore``s the request from those parts plus the prefix blocks it holds pinned in its cache,
then keeps the received blocks in its cache.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from libs.common.errors import BadRequest
from libs.common.hashing import hash_list
from libs.common.state_parts import PartSpec, StatePart
from libs.engine.batch import DecodeSequence, decode_step
from libs.engine.cache import PrefixCache
from libs.engine.model import LayerResult, ReferenceModel
from libs.engine.sampling import DecodeOutput, Sampling
from libs.engine.scheduler import DecodeLoop, run_ahead
from libs.engine.state import RequestState, plan_parts

DEFAULT_CACHE_BYTES = 256 * 2**20
_LOOP_TOKENS = 8192  # longer prompts are checked and hashed in a worker thread
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendLoad:
    """Load of one backend instance (what an ``InstanceLoad`` heartbeat reports)."""

    prefill_queue: int  # prefills running or waiting for the instance
    decode_active: int  # requests in the running decode batch
    decode_waiting: int  # requests waiting for a decode slot
    max_batch: int

    @property
    def free_decode_slots(self) -> int:
        """Decode slots a new request could take now."""
        return max(0, self.max_batch - self.decode_active - self.decode_waiting)


@dataclass(frozen=True)
class Restored:
    """A request ready to decode, in the backend's own memory (the received parts can be freed)."""

    request_id: str
    n_tokens: int
    state: object  # the backend's decode state (``RequestState``; None for simulated chips)
    stored_blocks: int  # received blocks added to the prefix cache


def check_skip(n_tokens: int, skip_blocks: int, block_size: int) -> int:
    """Tokens not sent for ``skip_blocks`` held blocks (``BadRequest`` unless the last token is still sent)."""
    if not 0 <= skip_blocks <= (n_tokens - 1) // block_size:
        raise BadRequest(
            f"skip_blocks={skip_blocks} must lie in [0, {(n_tokens - 1) // block_size}] "
            f"for {n_tokens} tokens in blocks of {block_size}"
        )
    return skip_blocks * block_size


def check_layout(specs: Sequence[PartSpec], parts: Sequence[StatePart]) -> dict[str, StatePart]:
    """Parts by key, if they are exactly ``specs`` (keys, dtypes, shapes); else ``BadRequest``."""
    by_key = {p.key: p for p in parts}
    if len(by_key) != len(parts) or set(by_key) != {s.key for s in specs}:
        raise BadRequest(f"state parts {sorted(by_key)} differ from the expected {sorted(s.key for s in specs)}")
    for spec in specs:
        array = by_key[spec.key].array
        if array.shape != spec.shape or array.dtype != np.dtype(spec.dtype):
            raise BadRequest(
                f"state part {spec.key} has shape {array.shape} {array.dtype}, expected {spec.shape} {spec.dtype}"
            )
    return by_key


async def checked_prompt(backend: Backend, tokens: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """The prompt as int32 and its block hashes (``BadRequest`` as ``check_prompt``), long ones off the event loop."""

    def check() -> tuple[np.ndarray, list[int]]:
        array = backend.check_prompt(tokens)
        return array, hash_list(array, backend.block_size)

    return await asyncio.to_thread(check) if len(tokens) > _LOOP_TOKENS else check()


class Backend(Protocol):
    """The interface gateways call; ``ReferenceBackend`` and ``SimulatedBackend`` implement it."""

    name: str
    model_name: str
    block_size: int
    max_prompt_tokens: int
    cache: PrefixCache

    def check_prompt(self, tokens: Sequence[int]) -> np.ndarray:
        """The prompt as int32, or ``BadRequest`` (empty, out of vocabulary, over ``max_prompt_tokens``)."""
        ...

    def plan_parts(self, n_tokens: int, skip_blocks: int = 0) -> list[PartSpec]:
        """Every part a prefill of ``n_tokens`` tokens will emit, in order (for the manifest)."""
        ...

    def prefill(
        self, request_id: str, tokens: Sequence[int], *, use_cache: bool = True, skip_blocks: int = 0
    ) -> AsyncIterator[list[StatePart]]:
        """Each layer's parts as soon as the layer is done, then the head parts."""
        ...

    async def restore(
        self, request_id: str, parts: Sequence[StatePart], *, held_blocks: int = 0, cache_blocks: bool = True
    ) -> Restored:
        """A request from received parts plus its first ``held_blocks`` blocks from the cache (pinned)."""
        ...

    def decode_restored(
        self, restored: Restored, max_tokens: int, sampling: Sampling | None = None
    ) -> AsyncIterator[DecodeOutput]:
        """Tokens of a restored request, step by step, in a shared batch."""
        ...

    def decode(
        self, request_id: str, parts: Sequence[StatePart], max_tokens: int, sampling: Sampling | None = None
    ) -> AsyncIterator[DecodeOutput]:
        """Tokens of a request whose whole state is ``parts``, step by step, in a shared batch."""
        ...

    def load(self) -> BackendLoad:
        """Current queue depths."""
        ...

    async def close(self) -> None:
        """Stop the decode loop; idempotent."""
        ...


class ReferenceBackend:
    """The reference model: real tokens, real KV, one prefill at a time, decode batched up to ``max_batch``."""

    name = "reference"

    def __init__(
        self,
        model: ReferenceModel | None = None,
        *,
        cache_capacity_bytes: int = DEFAULT_CACHE_BYTES,
        max_batch: int = 32,
    ) -> None:
        self.model = model or ReferenceModel()
        self.config = self.model.config
        self.model_name = "reference"
        self.block_size = self.config.block_size
        self.max_prompt_tokens = self.config.max_prompt_tokens
        self.cache = PrefixCache(cache_capacity_bytes)
        self._prefill_lock = asyncio.Lock()
        self._prefill_queue = 0
        self._decoder = DecodeLoop(self._step, max_batch)

    async def __aenter__(self) -> ReferenceBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def check_prompt(self, tokens: Sequence[int]) -> np.ndarray:
        """The prompt as int32, or ``BadRequest`` (empty, out of vocabulary, over ``max_prompt_tokens``)."""
        if len(tokens) > self.max_prompt_tokens:
            raise BadRequest(f"prompt of {len(tokens)} tokens is over the model's limit of {self.max_prompt_tokens}")
        return self.model.check_tokens(tokens)

    def plan_parts(self, n_tokens: int, skip_blocks: int = 0) -> list[PartSpec]:
        """Every part a prefill of ``n_tokens`` tokens will emit, in order (for the manifest)."""
        return plan_parts(self.config, n_tokens, check_skip(n_tokens, skip_blocks, self.block_size))

    async def prefill(
        self, request_id: str, tokens: Sequence[int], *, use_cache: bool = True, skip_blocks: int = 0
    ) -> AsyncIterator[list[StatePart]]:
        """Each layer's parts as soon as the layer is done, then the head; resumes from cached blocks.

        K and V start at token ``skip_blocks * block_size`` (views, no copies).
        """
        toks = self.check_prompt(tokens)
        skip = check_skip(len(toks), skip_blocks, self.block_size)
        async for parts in run_ahead(self._prefill(request_id, toks, use_cache)):
            if skip:
                parts = [
                    StatePart(p.layer, p.kind, p.name, p.array[skip:]) if p.name in ("k", "v") else p for p in parts
                ]
            yield parts

    async def _prefill(self, request_id: str, tokens: np.ndarray, use_cache: bool) -> AsyncIterator[list[StatePart]]:
        self._prefill_queue += 1
        try:
            async with self._prefill_lock:
                bs = self.block_size
                hashes = hash_list(tokens, bs)
                cached, prefix = 0, None
                if use_cache:
                    cached = min(self.cache.usable_blocks(hashes), (len(tokens) - 1) // bs)
                    if cached:
                        attn, linear = self.cache.take_prefix(hashes, cached)
                        prefix = await asyncio.to_thread(self._prefix_state, tokens[: cached * bs], attn, linear)
                log.debug("prefill", extra={"request_id": request_id, "tokens": len(tokens), "cached_blocks": cached})
                layers = self.model.prefill(tokens, prefix)
                results = []
                while (result := await asyncio.to_thread(next, layers, None)) is not None:
                    results.append(result)
                    if result.layer < self.config.n_layers:
                        yield result.parts
                if use_cache and len(hashes) > cached:  # before the head, so a finished prefill has cached
                    blocks = await asyncio.to_thread(self._new_blocks, results, cached, len(hashes))
                    parent = hashes[cached - 1] if cached else None
                    for kind, payloads, size in blocks:
                        self.cache.store(kind, hashes[cached:], payloads, [size] * len(payloads), parent)
                yield results[-1].parts
        finally:
            self._prefill_queue -= 1

    def _prefix_state(self, tokens: np.ndarray, attn: list, linear: dict[int, np.ndarray]) -> RequestState:
        """A state covering cached blocks: KV concatenated from ``attn_kv`` blocks, the linear checkpoint."""
        full = self.config.full_layers
        return RequestState(
            self.config,
            tokens=np.ascontiguousarray(tokens, dtype=np.int32),
            keys={layer: np.concatenate([block[layer][0] for block in attn]) for layer in full},
            values={layer: np.concatenate([block[layer][1] for block in attn]) for layer in full},
            linear=dict(linear),
            logits=None,
        )

    def _new_blocks(self, results: list[LayerResult], first: int, end: int) -> list[tuple[str, list, int]]:
        """Copies of the newly computed blocks ``first..end-1``: (kind, payloads, bytes per block)."""
        cfg, bs = self.config, self.block_size
        by_layer = {r.layer: r for r in results}
        kv = {layer: (by_layer[layer].parts[0].array, by_layer[layer].parts[1].array) for layer in cfg.full_layers}
        attn = [
            {layer: (k[b * bs : (b + 1) * bs].copy(), v[b * bs : (b + 1) * bs].copy()) for layer, (k, v) in kv.items()}
            for b in range(first, end)
        ]
        ckpts = {layer: {p.name: p.array for p in by_layer[layer].checkpoints} for layer in cfg.linear_layers}
        linear = [
            {layer: ckpts[layer][f"ckpt.{b + 1}"].copy() for layer in cfg.linear_layers} for b in range(first, end)
        ]
        return [
            ("attn_kv", attn, cfg.attn_kv_bytes_per_token * bs),
            ("linear_state", linear, cfg.linear_state_bytes),
        ]

    async def restore(
        self, request_id: str, parts: Sequence[StatePart], *, held_blocks: int = 0, cache_blocks: bool = True
    ) -> Restored:
        """A request from received parts plus its first ``held_blocks`` ``attn_kv`` blocks from the cache.

        The state is copied out of ``parts`` (their memory can be freed at once); with
        ``cache_blocks`` the received whole blocks join the cache as ``attn_kv`` blocks (KV events).
        """
        head = {p.key: p for p in parts}.get(f"{self.config.n_layers}/attn_kv/tokens")
        if head is None:
            raise BadRequest("the state has no tokens part")
        tokens = self.check_prompt(head.array)
        hashes = hash_list(tokens, self.block_size)
        skip = check_skip(len(tokens), held_blocks, self.block_size)
        by_key = check_layout(plan_parts(self.config, len(tokens), skip), parts)
        try:
            prefix = self.cache.payloads("attn_kv", hashes[:held_blocks])
        except KeyError:
            raise BadRequest(f"request {request_id}: a prefix block is not held by this instance") from None
        first = held_blocks if cache_blocks else len(hashes)
        state, blocks = await asyncio.to_thread(self._restore, by_key, prefix, tokens, first, len(hashes))
        if blocks:
            size = self.config.attn_kv_bytes_per_token * self.block_size
            parent = hashes[first - 1] if first else None
            self.cache.store("attn_kv", hashes[first:], blocks, [size] * len(blocks), parent)
        return Restored(request_id, len(tokens), state, len(blocks))

    def _restore(
        self, by_key: dict[str, StatePart], prefix: list, tokens: np.ndarray, first: int, end: int
    ) -> tuple[RequestState, list]:
        """The whole state in fresh arrays (prefix K/V joined to the received), and copies of blocks ``first..end-1``."""
        cfg, bs = self.config, self.block_size
        arrays = {key: np.array(part.array) for key, part in by_key.items() if part.name not in ("k", "v")}
        arrays[f"{cfg.n_layers}/attn_kv/tokens"] = tokens.copy()
        for layer in cfg.full_layers:
            for i, name in enumerate("kv"):
                received = by_key[f"{layer}/attn_kv/{name}"].array
                arrays[f"{layer}/attn_kv/{name}"] = np.concatenate([*(block[layer][i] for block in prefix), received])
        state = RequestState.from_parts(cfg, [StatePart(*_split_key(key), array) for key, array in arrays.items()])
        blocks = [
            {
                layer: (
                    state.keys[layer].view[b * bs : (b + 1) * bs].copy(),
                    state.values[layer].view[b * bs : (b + 1) * bs].copy(),
                )
                for layer in cfg.full_layers
            }
            for b in range(first, end)
        ]
        return state, blocks

    async def decode_restored(
        self, restored: Restored, max_tokens: int, sampling: Sampling | None = None
    ) -> AsyncIterator[DecodeOutput]:
        """Tokens of a restored request, step by step, in a shared batch."""
        sequence = DecodeSequence(
            restored.request_id, restored.state, max_tokens, sampling or Sampling(), self.config.eos_id
        )
        async for out in self._decoder.run(sequence):
            yield out

    async def decode(
        self, request_id: str, parts: Sequence[StatePart], max_tokens: int, sampling: Sampling | None = None
    ) -> AsyncIterator[DecodeOutput]:
        """Tokens of a request whose whole state is ``parts``, step by step, in a shared batch."""
        state = RequestState.from_parts(self.config, parts)  # uses the arrays as they are
        async for out in self.decode_restored(Restored(request_id, state.n_tokens, state, 0), max_tokens, sampling):
            yield out

    async def _step(self, sequences: list[DecodeSequence]) -> list[DecodeOutput]:
        return await asyncio.to_thread(decode_step, self.model, sequences)

    def load(self) -> BackendLoad:
        """Current queue depths."""
        d = self._decoder
        return BackendLoad(self._prefill_queue, d.active, d.waiting, d.max_batch)

    async def close(self) -> None:
        """Stop the decode loop; idempotent."""
        await self._decoder.close()


def _split_key(key: str) -> tuple[int, str, str]:
    """``(layer, kind, name)`` of a part key ``<layer>/<kind>/<name>``."""
    layer, kind, name = key.split("/", 2)
    return int(layer), kind, name
