"""Per-request scheduling: prompt to token ids, block hashes, KV-index lookup, live view, policy decision.

``prepare`` does what every attempt of a request shares (template, tokenizer, limits, hashes, the
lookup with its deadline: on error the request is routed without cache knowledge and the decision
says so); ``decide`` builds the view and asks ``libs/policy``, once per attempt.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, replace

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry

from libs.common.errors import BadRequest, NotFound, PrfaasError
from libs.common.messages import DecisionEvent, KvLookupReply, Sampling
from libs.engine.profiles import HARDWARE, ModelProfile, hardware_profile, model_profile
from libs.policy import PolicyConfig, RouteRequest, make_policy
from services.kv_index.client import KvIndexClient
from services.router.chat_template import ChatTemplate
from services.router.config import RouterConfig
from services.router.live_view import LiveView
from services.router.schemas import GenerationRequest, invalid
from services.router.token_cache import Encoded, TokenCache
from services.router.tokenization import PromptTokenizer

_PLAN_ON_LOOP_CHARS = 500_000  # cutting a text and looking its segments up takes ~2 ns a character: ~1 ms here


@dataclass
class Prepared:
    """What every attempt of one request shares."""

    request_id: str
    model: str
    profile: ModelProfile
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    block_size: int
    lookup: KvLookupReply | None
    index_status: str  # "ok", "unavailable: <why>", or "not asked: <why>"
    ttft_slo_s: float | None
    arrived: float  # monotonic


class Scheduler:
    """Turns a checked request into decisions for the router's site."""

    def __init__(
        self,
        config: RouterConfig,
        tokenizer: PromptTokenizer,
        template: ChatTemplate,
        view: LiveView,
        index: KvIndexClient,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.token_cache = TokenCache(
            tokenizer,
            max_bytes=config.token_cache_bytes,
            chunk_chars=config.token_cache_chunk_chars,
            verify_fraction=config.token_cache_verify_fraction,
            registry=registry if registry is not None else CollectorRegistry(),
        )
        self.template = template
        self.view = view
        self.index = index
        self.policy = make_policy(
            config.policy, PolicyConfig(threshold_tokens=config.threshold_tokens, transport=config.transport)
        )
        self.rng = random.Random()

    # --- models and limits ------------------------------------------------------------------

    def served_models(self) -> list[str]:
        """Models of live instances plus the configured ones."""
        return sorted(self.view.models() | set(self.config.models))

    def check_model(self, model: str) -> None:
        """NotFound (404) unless ``model`` is served."""
        if model not in self.config.models and model not in self.view.models():
            raise NotFound(
                f"The model '{model}' does not exist (served: {', '.join(self.served_models()) or 'none'})",
                code="model_not_found",
            )

    def max_prompt_tokens(self, model: str) -> int | None:
        """The least prompt limit among the config and the model's live instances (None: no limit)."""
        limits = [ld.max_prompt_tokens for ld in self.view.alive(model) if ld.max_prompt_tokens > 0]
        if self.config.max_prompt_tokens:
            limits.append(self.config.max_prompt_tokens)
        return min(limits) if limits else None

    def _max_tokens(self, req: GenerationRequest, prompt_tokens: int) -> int:
        """The request's ``max_tokens`` (by default what the context leaves, at most the configured default).

        The model's context (its least heartbeated prompt limit) holds the prompt and the completion;
        asking for more is a 400 ``context_length_exceeded``, as OpenAI and vLLM answer.
        """
        limit = self.max_prompt_tokens(req.model)
        asked = req.max_tokens if req.max_tokens is not None else 0
        if limit is not None and prompt_tokens + max(asked, 1) > limit:
            where = "messages" if req.kind == "chat" else "prompt"
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + asked:,} tokens ({prompt_tokens:,} in the {where}, {asked:,} in the completion). "
                f"Please reduce the length of the {where} or completion.",
                code="context_length_exceeded",
                param=where if prompt_tokens >= limit else "max_tokens",
            )
        if req.max_tokens is not None:
            return req.max_tokens
        return (
            self.config.default_max_tokens
            if limit is None
            else min(self.config.default_max_tokens, limit - prompt_tokens)
        )

    def block_size(self, model: str) -> int:
        """The block size the model's instances heartbeat (the config's if none does)."""
        return next((ld.block_size for ld in self.view.alive(model) if ld.block_size > 0), self.config.block_size)

    # --- prompt ---------------------------------------------------------------------------

    def _prompt_text(self, req: GenerationRequest) -> tuple[str, bool]:
        """The text to tokenize, and whether the tokenizer adds its specials (BOS) around it."""
        if req.kind == "chat":
            return self.template.render(req.messages), not self.tokenizer.template_has_bos
        return req.prompt_text, True

    async def prompt_ids(self, req: GenerationRequest) -> Encoded:
        """Token ids of the request's prompt, as a list and an array (token-id prompts are checked against the vocabulary).

        Texts go through the prefix cache; what is left to tokenize beyond ``tokenize_thread_chars`` characters is
        tokenized on a worker thread (the tokenizer releases the GIL), so a long prompt never stalls the event loop.
        """
        if req.prompt_ids is not None:
            vocab = self.tokenizer.vocab_size
            bad = next((t for t in req.prompt_ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise invalid("prompt", f"token id {bad} is outside the vocabulary [0, {vocab})")
            return Encoded(req.prompt_ids, np.asarray(req.prompt_ids, dtype=np.int64))
        text, add_special = self._prompt_text(req)
        cache = self.token_cache
        if len(text) > _PLAN_ON_LOOP_CHARS:
            return await asyncio.to_thread(cache.encode, text, add_special)
        plan = cache.plan(text, add_special)
        if plan.todo_chars > self.config.tokenize_thread_chars:
            return await asyncio.to_thread(cache.finish, plan)
        return cache.finish(plan)

    async def prepare(self, req: GenerationRequest, request_id: str, ttft_slo_s: float | None) -> Prepared:
        """Check the model and limits, tokenize, hash and look the prefix up (404/400 on a bad request)."""
        arrived = time.monotonic()
        self.check_model(req.model)
        prompt = await self.prompt_ids(req)
        ids = prompt.ids
        max_tokens = self._max_tokens(req, len(ids))
        profile = model_profile(self.config.profile_of(req.model))
        block_size = self.block_size(req.model)
        deadline_s = self.lookup_deadline_s(req.model, profile, len(ids), block_size)
        lookup, status = await self._lookup(prompt, block_size, profile.n_linear_layers > 0, deadline_s)
        sampling = req.sampling
        if self.tokenizer.eos_token_ids and not sampling.ignore_eos:
            sampling = msgspec.structs.replace(sampling, stop_token_ids=self.tokenizer.eos_token_ids)
        return Prepared(
            request_id, req.model, profile, ids, max_tokens, sampling, block_size, lookup, status, ttft_slo_s, arrived
        )

    def lookup_deadline_s(self, model: str, profile: ModelProfile, prompt_tokens: int, block_size: int) -> float:
        """How long to wait for the KV index: no longer than a full cache hit could save, within the configured bounds.

        A hit saves at most the prompt's prefill less that of its last block, on the slowest prefill
        hardware serving the model; waiting longer for the answer can only lose time. 0 (do not ask)
        when that saving is below the least wait and the prompt is within t, so the route is local
        whatever is cached and the instance choice cannot change by more than the saving.
        """
        cfg = self.config
        hardware = {ld.hardware for ld in self.view.alive(model) if ld.role == "prefill"}
        saving_s = max(
            (
                profile.prefill_time_s(prompt_tokens, hw) - profile.prefill_time_s(min(prompt_tokens, block_size), hw)
                for hw in (hardware_profile(h if h in HARDWARE else cfg.default_hardware) for h in hardware)
            ),
            default=cfg.index_timeout_s,
        )
        if saving_s < cfg.index_min_timeout_s and prompt_tokens <= self.policy.config.threshold_tokens:
            return 0.0
        return min(cfg.index_timeout_s, max(cfg.index_min_timeout_s, saving_s))

    async def _lookup(
        self, prompt: Encoded, block_size: int, hybrid: bool, deadline_s: float
    ) -> tuple[KvLookupReply | None, str]:
        """The index's answer for the prompt's full blocks (hashed only when the index is asked)."""
        if len(prompt.ids) < block_size:  # no full block: nothing to look up
            return None, "ok"
        if deadline_s == 0:
            return None, f"not asked: a full cache hit would save under {self.config.index_min_timeout_s * 1000:.1f} ms"
        hashes = self.token_cache.block_hashes(prompt, block_size)
        try:
            async with asyncio.timeout(deadline_s):
                return await self.index.lookup(hashes, hybrid=hybrid), "ok"
        except TimeoutError:
            return None, f"unavailable: no answer within {deadline_s * 1000:.1f} ms"
        except PrfaasError as e:
            return None, f"unavailable: {e}"

    # --- decisions ------------------------------------------------------------------------

    def route_request(self, prepared: Prepared) -> RouteRequest:
        """The policy's request: length, output budget, usable cached prefix per instance, TTFT target."""
        n = len(prepared.prompt_ids)
        if prepared.lookup is None:
            return RouteRequest(prepared.request_id, n, prepared.max_tokens, ttft_slo_s=prepared.ttft_slo_s)
        return RouteRequest.from_lookup(
            prepared.request_id, n, prepared.lookup, prepared.block_size, prepared.max_tokens, prepared.ttft_slo_s
        )

    def decide(
        self,
        prepared: Prepared,
        *,
        attempt: int = 0,
        exclude: frozenset[str] = frozenset(),
        local_only: bool = False,
        fallback_of: str = "",
    ) -> DecisionEvent:
        """One decision (NoCapacity if nothing can serve it), as the event the router publishes."""
        view = self.view.cluster_view(prepared.model, prepared.profile, exclude=exclude, local_only=local_only)
        decision = self.policy.decide(view, self.route_request(prepared), now=time.time(), rng=self.rng)
        if fallback_of:
            decision = msgspec.structs.replace(decision, fallback_of=fallback_of)
        n = len(prepared.prompt_ids)
        cached = {}
        if prepared.lookup is not None:
            cached = {s.site: min(n, s.usable_blocks * prepared.block_size) for s in prepared.lookup.sites}
        slo = prepared.ttft_slo_s
        return DecisionEvent(
            request_id=prepared.request_id,
            ts=decision.ts,
            site=self.config.site,
            router=self.config.router_id,
            model=prepared.model,
            cached_tokens=cached,
            route="fallback" if fallback_of else decision.choice,
            attempt=attempt,
            index=prepared.index_status,
            decision=decision,
            ttft_slo_s=slo,
            slo_met=None if slo is None else decision.predicted_ttft_s <= slo,
        )

    def set_threshold(self, threshold_tokens: int) -> None:
        """Apply a re-planned threshold to the policy (the slow timescale)."""
        cfg = self.policy.config
        max_t = max(cfg.max_threshold_tokens, threshold_tokens)
        self.policy = make_policy(
            self.config.policy, replace(cfg, threshold_tokens=threshold_tokens, max_threshold_tokens=max_t)
        )
