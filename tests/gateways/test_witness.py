"""Across two sites the decode side's first steps are the monolithic ones; broken state that crosses is caught.

Both gateways run in this process over the session's two-site supercluster (real NATS, real TCP KV), so
a test can corrupt what the prefill backend emits or what the decode instance holds, and check that the
witness (``libs.engine.witness``: the first two steps' log probabilities, 32 greedy tokens) sees it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from libs.bench.gateways import DECODE_SITE, PREFILL_SITE, Caller, gateway_env
from libs.common.hashing import hash_list
from libs.common.messages import Sampling
from libs.common.state_parts import StatePart
from libs.engine.backends import ReferenceBackend
from libs.engine.generate import generate
from libs.engine.model import ReferenceModel
from libs.engine.state import RequestState
from libs.engine.witness import LOGPROB_ATOL, logprob_mismatch, monolithic_logprobs
from services.decode_gateway.config import DecodeGatewayConfig
from services.decode_gateway.service import DecodeGatewayService
from services.prefill_gateway.config import PrefillGatewayConfig
from services.prefill_gateway.service import PrefillGatewayService
from tests.gateways.conftest import Sites

CLUSTER, PREFILL, DECODE = "witness", "witness-p0", "witness-d0"
MODEL = ReferenceModel()
CFG = MODEL.config
BS = CFG.block_size
WITNESS = Sampling(ignore_eos=True, logprobs=20)
_TEXT = (Path(__file__).parents[2] / "docs" / "architecture.md").read_text()

Mutation = Callable[[np.ndarray, list[StatePart]], list[StatePart]]


def _prompt(offset: int, n_tokens: int) -> list[int]:
    """``n_tokens`` byte tokens of varied text starting ``offset`` characters into the architecture page."""
    return MODEL.tokenizer.encode(_TEXT[offset:])[:n_tokens]


class MutatingBackend(ReferenceBackend):
    """A reference prefill backend whose emitted parts pass through ``mutation`` (none by default)."""

    mutation: Mutation | None = None

    async def prefill(self, request_id: str, tokens: Sequence[int], **kwargs) -> AsyncIterator[list[StatePart]]:
        """The reference prefill's parts, mutated on their way to the transport."""
        async for parts in super().prefill(request_id, tokens, **kwargs):
            yield parts if self.mutation is None else self.mutation(np.asarray(tokens, dtype=np.int32), parts)


@contextlib.asynccontextmanager
async def _pair(sites: Sites) -> AsyncIterator[tuple[Caller, MutatingBackend, ReferenceBackend]]:
    """A prefill gateway at the PrfaaS site and a decode gateway at the PD site, in this process, and a caller."""
    prefill_backend, decode_backend = MutatingBackend(), ReferenceBackend()
    prefill_cfg = PrefillGatewayConfig.from_env(
        gateway_env(
            "prefill_gateway",
            sites.cluster.url(PREFILL_SITE),
            site=PREFILL_SITE,
            cluster=CLUSTER,
            instances=PREFILL,
            heartbeat_s=0.1,
        )
    )
    decode_cfg = DecodeGatewayConfig.from_env(
        gateway_env(
            "decode_gateway", sites.cluster.url(DECODE_SITE), site=DECODE_SITE, instance=DECODE, heartbeat_s=0.1
        )
    )
    async with (
        PrefillGatewayService(sites.prefill_nc, {PREFILL: prefill_backend}, prefill_cfg),
        DecodeGatewayService(sites.decode_nc, decode_backend, decode_cfg),
        Caller(sites.decode_nc, cluster=CLUSTER) as caller,
    ):
        await caller.reachable(sites.prefill_nc)
        try:
            yield caller, prefill_backend, decode_backend
        finally:
            await prefill_backend.close()
            await decode_backend.close()


def _zeroed(layers: set[int]) -> Mutation:
    """Every K/V and linear state of ``layers`` replaced by zeros."""

    def mutate(_tokens: np.ndarray, parts: list[StatePart]) -> list[StatePart]:
        return [StatePart(p.layer, p.kind, p.name, np.zeros_like(p.array)) if p.layer in layers else p for p in parts]

    return mutate


def _linear_state_at_last_boundary(tokens: np.ndarray, parts: list[StatePart]) -> list[StatePart]:
    """Linear states of the last block boundary before the prompt's end instead of the prompt's end."""
    if not any(p.name == "state" for p in parts):
        return parts
    at_boundary = _boundary_state(tokens[: len(tokens) // BS * BS].tobytes())
    return [StatePart(p.layer, p.kind, p.name, at_boundary.linear[p.layer]) if p.name == "state" else p for p in parts]


@functools.lru_cache(maxsize=1)
def _boundary_state(tokens: bytes) -> RequestState:
    return MODEL.prefill_state(np.frombuffer(tokens, dtype=np.int32))


async def test_the_decode_side_continues_exactly_from_the_transferred_state(sites):
    """A whole transfer, then a delta transfer joined to a held prefix: log probabilities within 1e-4, 32 tokens equal."""
    first = _prompt(0, 1500)
    second = first[: 16 * BS] + _prompt(9000, 700)  # shares 16 blocks with the first
    async with _pair(sites) as (caller, _, _):
        for prompt, held in ((first, 0), (second, 16)):
            out = await caller.request(prompt, DECODE, model="reference", max_tokens=32, sampling=WITNESS)
            assert out.reservation.held_blocks == held
            assert logprob_mismatch(out.logprobs, monolithic_logprobs(MODEL, prompt)) <= LOGPROB_ATOL
            assert out.tokens == generate(MODEL, prompt, 32, WITNESS)


@pytest.mark.parametrize(
    ("name", "mutation"),
    [
        ("zeroed state", _zeroed(set(range(CFG.n_layers)))),
        ("zeroed linear layer", _zeroed({1})),
        ("zeroed attention layer", _zeroed({CFG.full_layers[-1]})),
        ("linear state from the wrong block boundary", _linear_state_at_last_boundary),
    ],
)
async def test_state_broken_on_its_way_is_caught(sites, name, mutation):
    """Negative control: the prefill side sends broken state; the witness rejects what the decode side produced."""
    prompt = _prompt(3000, 1500)
    async with _pair(sites) as (caller, prefill_backend, _):
        prefill_backend.mutation = mutation
        out = await caller.request(prompt, DECODE, model="reference", max_tokens=32, sampling=WITNESS)
    assert out.final is not None and out.final.finish_reason == "length", name
    assert logprob_mismatch(out.logprobs, monolithic_logprobs(MODEL, prompt)) > 10 * LOGPROB_ATOL, name


async def test_a_wrong_block_in_the_middle_of_a_held_prefix_is_caught(sites):
    """Negative control: the decode instance holds a foreign block mid-prefix; the delta transfer's result is rejected."""
    first = _prompt(0, 20 * BS)
    second = first + _prompt(6000, 300)
    async with _pair(sites) as (caller, _, decode_backend):
        await caller.request(first, DECODE, model="reference", max_tokens=1)
        held = decode_backend.cache.payloads("attn_kv", _hashes(first))
        for layer in CFG.full_layers:
            for i in (0, 1):
                held[10][layer][i][:] = held[3][layer][i]
        out = await caller.request(second, DECODE, model="reference", max_tokens=32, sampling=WITNESS)
    assert out.reservation.held_blocks == 20
    assert logprob_mismatch(out.logprobs, monolithic_logprobs(MODEL, second)) > 10 * LOGPROB_ATOL


def _hashes(tokens: list[int]) -> list[int]:
    return hash_list(tokens, BS)
