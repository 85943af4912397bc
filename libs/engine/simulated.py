"""A modelled chip behind the backend interface: profile timings, modelled KV sizes, checkable bytes.

``time_scale`` multiplies every modelled duration and ``byte_scale`` every modelled size, so a
2-core machine can run a scaled copy of a large cluster with every ratio kept (for example
``time_scale=0.01`` and ``byte_scale=0.001``). Part contents are a pure function of (request id,
part key, byte offset), so a receiver checks any chunk with :func:`verify_chunk` without having
seen the rest. A ``kv`` part trimmed to the tokens a receiver lacks is the same byte range of
the whole part (it starts at the skipped tokens' modelled size), so it verifies at that offset.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from libs.common.errors import BadRequest, NoCapacity, TransferFailed
from libs.common.hashing import DEFAULT_BLOCK_SIZE, hash_list
from libs.common.messages import TokenLogprob
from libs.common.state_parts import PartSpec, StatePart
from libs.engine.backends import DEFAULT_CACHE_BYTES, BackendLoad, Restored, check_layout, check_skip
from libs.engine.cache import PrefixCache
from libs.engine.sampling import DecodeOutput, Sampling, StopRules
from libs.engine.scheduler import DecodeLoop, run_ahead

if TYPE_CHECKING:
    from libs.engine.profiles import HardwareProfile, ModelProfile

_TEXT = b"Prefill-as-a-Service ships the KV cache of hybrid models between datacenters. "
_EOS_NEVER = -1  # simulated decode never samples EOS
_THREAD_BYTES = 1 << 20  # generate or check more than this off the event loop
_M1, _M2, _GOLD = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x9E3779B97F4A7C15


def _seed(request_id: str, key: str) -> int:
    digest = hashlib.blake2b(f"{request_id}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def synthetic_bytes(request_id: str, key: str, offset: int, nbytes: int) -> np.ndarray:
    """Bytes ``offset .. offset + nbytes`` of the part ``key`` of a request (uint8 array).

    Word ``i`` (bytes ``8i .. 8i+7``, little-endian) is MurmurHash3's fmix64 of ``seed ^ (i * K)``
    with ``seed`` the first 8 bytes of BLAKE2b(request id, NUL, key).
    """
    first, last = offset // 8, (offset + nbytes + 7) // 8
    x = np.arange(first, last, dtype=np.uint64) * np.uint64(_GOLD)
    x ^= np.uint64(_seed(request_id, key))
    for mult in (_M1, _M2):
        x ^= x >> np.uint64(33)
        x *= np.uint64(mult)
    x ^= x >> np.uint64(33)
    start = offset - 8 * first
    return x.astype("<u8", copy=False).view(np.uint8)[start : start + nbytes]


def verify_chunk(request_id: str, key: str, offset: int, data: bytes | memoryview | np.ndarray) -> bool:
    """True if ``data`` is exactly what a simulated prefill emitted at ``offset`` of part ``key``."""
    got = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
    return bool(np.array_equal(got, synthetic_bytes(request_id, key, offset, got.size)))


def verify_part(request_id: str, part: StatePart) -> bool:
    """True if a whole simulated part has the content its request id and key imply."""
    return verify_chunk(request_id, part.key, 0, part.array)


class SimulatedBackend:
    """A chip from a hardware profile running a model from a model profile, scaled in time and bytes."""

    def __init__(
        self,
        hardware: str | HardwareProfile,
        model: str | ModelProfile,
        time_scale: float = 1.0,
        byte_scale: float = 1.0,
        *,
        cache_capacity_bytes: int = DEFAULT_CACHE_BYTES,
        block_size: int = DEFAULT_BLOCK_SIZE,
        verify: bool = True,
        max_batch: int | None = None,
        decode_chunk: int = 1,
    ) -> None:
        from libs.engine import profiles  # profiles are plain data; imported here to keep the model light

        self.hardware = profiles.hardware_profile(hardware) if isinstance(hardware, str) else hardware
        self.model = profiles.model_profile(model) if isinstance(model, str) else model
        if time_scale < 0 or byte_scale <= 0:
            raise BadRequest(f"time_scale must be >= 0 and byte_scale > 0, got {time_scale}, {byte_scale}")
        self.name = f"sim:{self.model.name}@{self.hardware.name}"
        self.model_name = self.model.name
        self.max_prompt_tokens = self.model.max_prompt_tokens
        self.time_scale = time_scale
        self.byte_scale = byte_scale
        self.block_size = block_size
        self.verify = verify
        if decode_chunk < 1:
            raise BadRequest(f"decode_chunk must be >= 1, got {decode_chunk}")
        self.decode_chunk = decode_chunk
        kinds = [
            k for k, n in (("attn_kv", self.model.n_full_layers), ("linear_state", self.model.n_linear_layers)) if n
        ]
        self.cache = PrefixCache(cache_capacity_bytes, kinds)
        self._prefill_lock = asyncio.Lock()
        self._prefill_queue = 0
        # 0: the model cannot decode on this chip (weights do not fit, or a prefill-only chip)
        limit = 0 if self.hardware.prefill_only else self.model.max_batch(self.hardware)
        self.max_batch = limit if max_batch is None else min(max_batch, limit)
        self._decoder = DecodeLoop(self._step, max(1, self.max_batch))
        n_full, n_layers = self.model.n_full_layers, self.model.n_layers
        # Full-attention layers spread evenly with the last layer full (3:1 over 8 layers -> 3, 7).
        self.full_layers = tuple(round((j + 1) * n_layers / n_full) - 1 for j in range(n_full))

    async def __aenter__(self) -> SimulatedBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _scaled(self, nbytes: float) -> int:
        return int(round(nbytes * self.byte_scale))

    def _kv_bytes(self, tokens: int) -> int:
        """Modelled (scaled) bytes of one full-attention layer's KV over ``tokens`` tokens."""
        return self._scaled(self.model.attn_kv_bytes_per_token / self.model.n_full_layers * tokens)

    def check_prompt(self, tokens: Sequence[int]) -> np.ndarray:
        """The prompt as int32, or ``BadRequest`` (empty, ids outside [0, 2**31), over ``max_prompt_tokens``)."""
        toks = np.asarray(tokens)
        if toks.ndim != 1 or toks.size == 0 or toks.dtype.kind not in "iu" or toks.min() < 0 or toks.max() >= 2**31:
            raise BadRequest("a prompt needs at least one token, every id an integer in [0, 2**31)")
        if toks.size > self.max_prompt_tokens:
            raise BadRequest(
                f"prompt of {toks.size} tokens is over {self.model.name}'s limit of {self.max_prompt_tokens}"
            )
        return np.ascontiguousarray(toks, dtype=np.int32)

    def plan_parts(self, n_tokens: int, skip_blocks: int = 0) -> list[PartSpec]:
        """Every part a prefill emits: one per layer (modelled size; ``kv`` without skipped blocks), then the tokens."""
        m = self.model
        skip = check_skip(n_tokens, skip_blocks, self.block_size)
        specs = []
        for layer in range(m.n_layers):
            if layer in self.full_layers:
                size = self._kv_bytes(n_tokens) - self._kv_bytes(skip)
                specs.append(PartSpec(layer=layer, kind="attn_kv", name="kv", shape=(size,), dtype="uint8"))
            else:
                size = self._scaled(m.linear_state_bytes / m.n_linear_layers)
                specs.append(PartSpec(layer=layer, kind="linear_state", name="state", shape=(size,), dtype="uint8"))
        head = self.model.n_layers
        specs.append(PartSpec(layer=head, kind="attn_kv", name="tokens", shape=(n_tokens,), dtype="int32"))
        return specs

    async def prefill(
        self, request_id: str, tokens: Sequence[int], *, use_cache: bool = True, skip_blocks: int = 0
    ) -> AsyncIterator[list[StatePart]]:
        """Each layer's parts at its modelled finish time, then the tokens; cached blocks shorten the wait."""
        toks = self.check_prompt(tokens)
        check_skip(len(toks), skip_blocks, self.block_size)
        async for parts in run_ahead(self._prefill(request_id, toks, use_cache, skip_blocks)):
            yield parts

    async def _prefill(
        self, request_id: str, tokens: np.ndarray, use_cache: bool, skip_blocks: int
    ) -> AsyncIterator[list[StatePart]]:
        self._prefill_queue += 1
        try:
            async with self._prefill_lock:
                n, bs = len(tokens), self.block_size
                hashes = hash_list(tokens, bs)
                cached = min(self.cache.usable_blocks(hashes), (n - 1) // bs) if use_cache else 0
                if cached:
                    self.cache.take_prefix(hashes, cached)
                total_s = self.model.prefill_time_s(n, self.hardware)
                if cached:  # skip the prefix's own work; pay the fixed overhead and attention over it
                    total_s += self.model.prefill_time_s(0, self.hardware)
                    total_s -= self.model.prefill_time_s(cached * bs, self.hardware)
                layer_s = max(0.0, total_s) * self.time_scale / self.model.n_layers
                start = time.monotonic()
                specs = self.plan_parts(n, skip_blocks)
                for layer, spec in enumerate(specs[:-1]):
                    offset = self._kv_bytes(skip_blocks * bs) if spec.kind == "attn_kv" else 0
                    part = await self._make_part(request_id, spec, offset)
                    await asyncio.sleep(max(0.0, start + (layer + 1) * layer_s - time.monotonic()))
                    yield [part]
                if use_cache and len(hashes) > cached:  # before the head, so a finished prefill has cached
                    self._store_blocks(hashes, cached)
                yield [StatePart(self.model.n_layers, "attn_kv", "tokens", tokens)]
        finally:
            self._prefill_queue -= 1

    async def _make_part(self, request_id: str, spec: PartSpec, offset: int) -> StatePart:
        if spec.nbytes > _THREAD_BYTES:
            data = await asyncio.to_thread(synthetic_bytes, request_id, spec.key, offset, spec.nbytes)
        else:
            data = synthetic_bytes(request_id, spec.key, offset, spec.nbytes)
        return StatePart(spec.layer, spec.kind, spec.name, data)

    def _store_blocks(self, hashes: list[int], first: int) -> None:
        """Record the new blocks with their modelled (scaled) sizes; simulated blocks carry no payload."""
        new = hashes[first:]
        parent = hashes[first - 1] if first else None
        sizes = {
            "attn_kv": self._scaled(self.model.attn_kv_bytes_per_token * self.block_size),
            "linear_state": self._scaled(self.model.linear_state_bytes),
        }
        for kind in self.cache.kinds:
            self.cache.store(kind, new, [None] * len(new), [sizes[kind]] * len(new), parent)

    async def restore(
        self, request_id: str, parts: Sequence[StatePart], *, held_blocks: int = 0, cache_blocks: bool = True
    ) -> Restored:
        """Check received parts (sizes, and content at their offsets if ``verify``); cache the received blocks."""
        head = {p.key: p for p in parts}.get(f"{self.model.n_layers}/attn_kv/tokens")
        if head is None:
            raise BadRequest("the state has no tokens part")
        tokens = self.check_prompt(head.array)
        n, bs = len(tokens), self.block_size
        specs = self.plan_parts(n, held_blocks)
        by_key = check_layout(specs, parts)
        if (
            held_blocks
            and self.cache.leading_blocks("attn_kv", hash_list(tokens[: held_blocks * bs], bs)) < held_blocks
        ):
            raise BadRequest(f"request {request_id}: a prefix block is not held by this instance")
        if self.verify:
            kv_offset = self._kv_bytes(held_blocks * bs)
            payload = [(by_key[s.key], kv_offset if s.kind == "attn_kv" else 0) for s in specs[:-1]]

            def check() -> bool:
                return all(verify_chunk(request_id, p.key, off, p.array) for p, off in payload)

            ok = await asyncio.to_thread(check) if sum(p.nbytes for p, _ in payload) > _THREAD_BYTES else check()
            if not ok:
                raise TransferFailed(f"request {request_id}: a state part does not match its expected content")
        stored = 0
        if cache_blocks and "attn_kv" in self.cache.kinds and n // bs > held_blocks:
            hashes = hash_list(tokens, bs)
            new = hashes[held_blocks:]
            size = self._scaled(self.model.attn_kv_bytes_per_token * bs)
            self.cache.store(
                "attn_kv", new, [None] * len(new), [size] * len(new), hashes[held_blocks - 1] if held_blocks else None
            )
            stored = len(new)
        return Restored(request_id, n, None, stored)

    async def decode_restored(
        self, restored: Restored, max_tokens: int, sampling: Sampling | None = None
    ) -> AsyncIterator[DecodeOutput]:
        """Deterministic text tokens at the modelled step time of the current batch size."""
        if self.max_batch < 1:
            raise NoCapacity(f"{self.model.name} cannot decode on {self.hardware.name}")
        sampling = sampling or Sampling()
        sequence = _SimSequence(restored.request_id, StopRules(sampling, max_tokens, _EOS_NEVER), sampling.logprobs)
        async for out in self._decoder.run(sequence):
            yield out

    async def decode(
        self, request_id: str, parts: Sequence[StatePart], max_tokens: int, sampling: Sampling | None = None
    ) -> AsyncIterator[DecodeOutput]:
        """Tokens of a request whose whole state is ``parts`` (checked first), in a shared batch."""
        if self.max_batch < 1:
            raise NoCapacity(f"{self.model.name} cannot decode on {self.hardware.name}")
        restored = await self.restore(request_id, parts, cache_blocks=False)
        async for out in self.decode_restored(restored, max_tokens, sampling):
            yield out

    async def _step(self, sequences: list[_SimSequence]) -> list[DecodeOutput]:
        """Up to ``decode_chunk`` steps at the batch's modelled step time, in one wake-up.

        A batch with a sequence before its first token steps once (chunking never delays a first
        token); a request arriving mid-chunk ends the chunk at the step under way, so it joins the
        batch as soon as it would have one step at a time. Each sequence's tokens of the chunk go
        out as one output: the same tokens at the same modelled times, in fewer messages.
        """
        step_s = self.model.decode_step_s(len(sequences), self.hardware) * self.time_scale
        steps = 1 if any(seq.rules.n_generated == 0 for seq in sequences) else self.decode_chunk
        if steps > 1 and step_s > 0:
            started = time.monotonic()
            try:
                await asyncio.wait_for(self._decoder.arrived.wait(), timeout=steps * step_s)
            except TimeoutError:
                pass
            else:
                done = min(steps, math.ceil((time.monotonic() - started) / step_s))  # the step under way completes
                await asyncio.sleep(max(0.0, started + done * step_s - time.monotonic()))
                steps = done
        else:
            await asyncio.sleep(steps * step_s)
        return [seq.advance(steps) for seq in sequences]

    def load(self) -> BackendLoad:
        """Current queue depths."""
        d = self._decoder
        return BackendLoad(self._prefill_queue, d.active, d.waiting, self.max_batch)

    async def close(self) -> None:
        """Stop the decode loop; idempotent."""
        await self._decoder.close()


class _SimSequence:
    """A simulated request: its tokens cycle through a fixed text from an offset set by its id (each one certain)."""

    def __init__(self, request_id: str, rules: StopRules, top_logprobs: int | None) -> None:
        self.rules = rules
        self.top_logprobs = top_logprobs
        self._pos = _seed(request_id, "decode") % len(_TEXT)

    def advance(self, steps: int) -> DecodeOutput:
        """The tokens of ``steps`` steps (fewer if a stop rule ends the request) as one output."""
        outs = []
        for _ in range(steps):
            outs.append(self._next())
            if outs[-1].finish_reason is not None:
                break
        if len(outs) == 1:
            return outs[0]
        return DecodeOutput(
            [t for o in outs for t in o.token_ids], outs[-1].finish_reason, tuple(lp for o in outs for lp in o.logprobs)
        )

    def _next(self) -> DecodeOutput:
        token = _TEXT[self._pos % len(_TEXT)]
        self._pos += 1
        if self.top_logprobs is None:
            return self.rules.accept(token)
        top = (token,)[: self.top_logprobs]
        return self.rules.accept(
            token, TokenLogprob(token_id=token, logprob=0.0, top_ids=top, top_logprobs=(0.0,) * len(top))
        )
