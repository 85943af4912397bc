"""What gateways wrap: one backend interface, and the reference model behind it (compute in threads).

A backend prefills layer by layer (an async iterator of each layer's ``StatePart`` list, the head
last), decodes with continuous batching (an async iterator of ``DecodeOutput``), and keeps a
prefix-block cache whose ``drain_events()`` the gateway publishes as KV events.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from libs.common.hashing import hash_list
from libs.common.state_parts import PartSpec, StatePart
from libs.engine.batch import DecodeSequence, decode_step
from libs.engine.cache import PrefixCache
from libs.engine.model import LayerResult, ReferenceModel
from libs.engine.sampling import DecodeOutput, Sampling
from libs.engine.scheduler import DecodeLoop, run_ahead
from libs.engine.state import RequestState, plan_parts

DEFAULT_CACHE_BYTES = 256 * 2**20
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


class Backend(Protocol):
    """The interface gateways call; ``ReferenceBackend`` and ``SimulatedBackend`` implement it."""

    name: str
    block_size: int
    cache: PrefixCache

    def plan_parts(self, n_tokens: int) -> list[PartSpec]:
        """Every part a prefill of ``n_tokens`` tokens will emit, in order (for the manifest)."""
        ...

    def prefill(self, request_id: str, tokens: Sequence[int], *, use_cache: bool = True) -> AsyncIterator[list[StatePart]]:
        """Each layer's parts as soon as the layer is done, then the head parts."""
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
        self.block_size = self.config.block_size
        self.cache = PrefixCache(cache_capacity_bytes)
        self._prefill_lock = asyncio.Lock()
        self._prefill_queue = 0
        self._decoder = DecodeLoop(self._step, max_batch)

    async def __aenter__(self) -> ReferenceBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def plan_parts(self, n_tokens: int) -> list[PartSpec]:
        """Every part a prefill of ``n_tokens`` tokens will emit, in order (for the manifest)."""
        return plan_parts(self.config, n_tokens)

    async def prefill(
        self, request_id: str, tokens: Sequence[int], *, use_cache: bool = True
    ) -> AsyncIterator[list[StatePart]]:
        """Each layer's parts as soon as the layer is done, then the head; resumes from cached blocks."""
        async for parts in run_ahead(self._prefill(request_id, self.model.check_tokens(tokens), use_cache)):
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
        linear = [{layer: ckpts[layer][f"ckpt.{b + 1}"].copy() for layer in cfg.linear_layers} for b in range(first, end)]
        return [
            ("attn_kv", attn, cfg.attn_kv_bytes_per_token * bs),
            ("linear_state", linear, cfg.linear_state_bytes),
        ]

    async def decode(
        self, request_id: str, parts: Sequence[StatePart], max_tokens: int, sampling: Sampling | None = None
    ) -> AsyncIterator[DecodeOutput]:
        """Tokens of a request whose whole state is ``parts``, step by step, in a shared batch."""
        state = RequestState.from_parts(self.config, parts)
        sequence = DecodeSequence(request_id, state, max_tokens, sampling or Sampling(), self.config.eos_id)
        async for out in self._decoder.run(sequence):
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
