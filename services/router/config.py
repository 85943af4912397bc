"""Configuration of the router, from ``ROUTER_*`` environment variables; errors name the key."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from libs.common import subjects
from libs.common.config import EnvReader
from libs.common.errors import ConfigError
from libs.common.hashing import DEFAULT_BLOCK_SIZE
from libs.common.messages import TRANSPORTS
from libs.engine.profiles import HARDWARE, MODELS
from libs.policy import POLICIES
from libs.policy.breaker import BreakerConfig
from services.router.auth import load_digests
from services.router.schemas import RequestLimits

_FIRST_TOKEN_GRACE_S = 5.0  # past the job deadline: time for the decode side's typed failure to arrive


def _breaker(r: EnvReader, d: BreakerConfig) -> BreakerConfig:
    """``BREAKER_FAILURES``, ``BREAKER_WINDOW_S``, ``BREAKER_SILENCE_S``, ``BREAKER_HOLD_S``, ``BREAKER_MAX_HOLD_S``,
    ``BREAKER_RECOVER_S``."""
    try:
        return BreakerConfig(
            failures=r.int("BREAKER_FAILURES", d.failures, minimum=1),
            window_s=r.float("BREAKER_WINDOW_S", d.window_s, minimum=0.001),
            silence_s=r.float("BREAKER_SILENCE_S", d.silence_s, minimum=0.001),
            hold_s=r.float("BREAKER_HOLD_S", d.hold_s, minimum=0.001),
            max_hold_s=r.float("BREAKER_MAX_HOLD_S", d.max_hold_s, minimum=0.001),
            recover_s=r.float("BREAKER_RECOVER_S", d.recover_s, minimum=0.0),
        )
    except ConfigError as e:
        raise ConfigError(f"ROUTER_BREAKER_*: {e.message}") from None


def _request_limits(r: EnvReader, d: RequestLimits) -> RequestLimits:
    """``MAX_STOP_SEQUENCES``, ``MAX_STOP_CHARS``, ``MAX_TOKENS_LIMIT``."""
    return RequestLimits(
        max_stop_sequences=r.int("MAX_STOP_SEQUENCES", d.max_stop_sequences, minimum=0),
        max_stop_chars=r.int("MAX_STOP_CHARS", d.max_stop_chars, minimum=1),
        max_tokens=r.int("MAX_TOKENS_LIMIT", d.max_tokens, minimum=1),
    )


def _pairs(key: str, items: tuple[str, ...], known) -> dict[str, str]:
    """``name=value`` items, each value one of ``known``."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"ROUTER_{key}: {item!r} is not of the form model=profile")
        if value.strip() not in known:
            raise ConfigError(f"ROUTER_{key}: {item!r}: expected a profile among {', '.join(sorted(known))}")
        out[name.strip()] = value.strip()
    return out


def _capacities(items: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """``src>dst=gbps`` items: the provisioned capacity of unpaced site pairs."""
    out = {}
    for item in items:
        pair, sep, gbps = item.partition("=")
        src, arrow, dst = pair.partition(">")
        try:
            value = float(gbps)
        except ValueError:
            value = -1.0
        if not sep or not arrow or value <= 0:
            raise ConfigError(f"ROUTER_LINK_CAPACITIES: {item!r} is not of the form src_site>dst_site=gbps")
        try:
            out[(subjects.token(src.strip(), "site"), subjects.token(dst.strip(), "site"))] = value
        except ValueError as e:
            raise ConfigError(f"ROUTER_LINK_CAPACITIES: {item!r}: {e}") from None
    return out


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router needs to know; deadlines in seconds."""

    nats_url: str = "nats://127.0.0.1:4222"
    site: str = "dc-pd"  # the decode (PD) site this router serves
    router_id: str = "router"
    host: str = "0.0.0.0"
    port: int = 8000
    api_key_digests: tuple[bytes, ...] = ()  # SHA-256 digests of the accepted API keys (empty: no key required)
    rate_limit_rps: float = 0.0  # requests per second per API key (per client address without keys); 0: no limit
    rate_limit_burst: int = 20  # requests a client may send at once before the rate applies
    rate_limit_clients: int = 10_000  # clients whose buckets are kept (the least recently seen is dropped)
    models: tuple[str, ...] = ()  # served even before an instance heartbeats
    model_profiles: Mapping[str, str] = field(default_factory=dict)  # model -> libs.engine profile
    default_model_profile: str = "reference"
    default_hardware: str = "h200"  # for instances heartbeating a hardware name without a profile
    tokenizer: str = "byte"  # "byte" (the reference model) or a tokenizer.json file or its directory
    tokenize_thread_chars: int = 4096  # longer texts are tokenized on a worker thread (~1 ms of tokenizing here)
    token_cache_bytes: int = 256 << 20  # the prefix tokenization cache's memory (0: no cache)
    token_cache_chunk_chars: int = 1024  # about how many characters the cache keeps per segment
    token_cache_verify_fraction: float = 0.01  # requests also tokenized whole in the background to check the cache
    chat_template: str = ""  # a Jinja chat template file ("": the tokenizer's, else a plain default)
    max_prompt_tokens: int = 0  # 0: the least limit the model's instances heartbeat
    default_max_tokens: int = 256
    block_size: int = DEFAULT_BLOCK_SIZE
    policy: str = "adaptive"
    threshold_tokens: int | None = None  # t, required: it depends on the deployment (`prfaas plan` derives it)
    transport: str = "tcp"
    link_capacities: Mapping[tuple[str, str], float] = field(default_factory=dict)
    default_link_capacity_gbps: float = 100.0  # an unpaced pair without a configured capacity
    index_timeout_s: float = 0.1  # the longest wait for the KV index (shorter when a hit could save less)
    index_min_timeout_s: float = 0.005  # the shortest
    reserve_timeout_s: float = 2.0
    accept_timeout_s: float = 2.0
    first_token_timeout_s: float = (
        0.0  # 0: the job's deadline (job_timeout_s) and a grace: the decode side's leases catch stalls
    )
    token_timeout_s: float = 30.0
    resend_after_s: float = 2.0  # a stream silent this long after its first token asks the decode side for what it lost
    job_timeout_s: float = 120.0
    lease_min_s: float = 10.0  # the least reservation lease sent with a decode job
    lease_margin: float = 2.0  # the lease is this many times the predicted wait for the first KV (queue + first layer)
    max_attempts: int = 4
    instance_ttl_s: float = 2.0
    pending_ttl_s: float = 10.0
    replan_interval_s: float = 300.0  # 0: no slow timescale
    replan_history: int = 2000
    max_body_bytes: int = 4 << 20
    max_line_bytes: int = 8190  # the request line (method, path and query)
    max_header_bytes: int = 8190  # one header line
    max_headers: int = 128
    idle_timeout_s: float = 30.0  # a connection that has not sent a whole request head this long is closed
    max_connections: int = 1024  # open HTTP connections; past it a new one is closed at once
    read_timeout_s: float = 30.0
    request_limits: RequestLimits = RequestLimits()  # caps on request fields that cost work
    write_timeout_s: float = 30.0  # a streaming client that takes no data this long is treated as gone
    retry_after_s: int = 1
    decisions_max_age_s: float = 7 * 24 * 3600.0
    decisions_max_bytes: int = 1 << 30
    connect_timeout_s: float = 5.0
    stop_timeout_s: float = (
        5.0  # each step of a stop (HTTP requests in flight, subscriptions, owned tasks) gets this long
    )
    ready_timeout_s: float = 1.0  # /readyz: how long the KV index may take to answer its probe lookup
    ready_requires_kv_path: bool = False  # /readyz: 503 (not only "degraded") while no KV transfer can cross
    breaker: BreakerConfig = BreakerConfig()  # when a link's breaker opens and how it comes back
    settle_wait_s: float = 1.0  # after the last token: how long the outcome waits for a trailing prefill status
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if self.threshold_tokens is None:
            raise ConfigError(
                "ROUTER_THRESHOLD_TOKENS is required: the offload threshold t depends on the model, hardware, instance "
                "counts, link and workload (`prfaas plan` gives it for a deployment)"
            )
        if self.threshold_tokens < 0:
            raise ConfigError(f"ROUTER_THRESHOLD_TOKENS={self.threshold_tokens!r}: expected an integer >= 0")
        if not 0.0 <= self.token_cache_verify_fraction <= 1.0:
            raise ConfigError(f"ROUTER_TOKEN_CACHE_VERIFY_FRACTION={self.token_cache_verify_fraction!r}: expected 0..1")
        if self.index_min_timeout_s > self.index_timeout_s:
            raise ConfigError(
                f"ROUTER_INDEX_MIN_TIMEOUT_S={self.index_min_timeout_s!r}: must not exceed "
                f"ROUTER_INDEX_TIMEOUT_S={self.index_timeout_s!r}"
            )

    @property
    def first_token_wait_s(self) -> float:
        """How long an attempt waits for its first token (or a typed failure) while its instances heartbeat."""
        return self.first_token_timeout_s or self.job_timeout_s + _FIRST_TOKEN_GRACE_S

    def profile_of(self, model: str) -> str:
        """The libs.engine model profile used to predict ``model``'s timings."""
        if model in self.model_profiles:
            return self.model_profiles[model]
        return model if model in MODELS else self.default_model_profile

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RouterConfig:
        """Read ``ROUTER_<FIELD>`` variables; unset ones keep their defaults."""
        r = EnvReader("ROUTER_", os.environ if env is None else env)
        d = cls(threshold_tokens=0)  # the other fields' defaults
        return cls(
            nats_url=r.nats_url(d.nats_url),
            site=r.name("SITE", d.site),
            router_id=r.name("ID", f"router-{socket.gethostname().split('.')[0]}-{os.getpid()}"),
            host=r.str("HOST", d.host),
            port=r.int("PORT", d.port, minimum=0),
            api_key_digests=load_digests(r.list("API_KEYS"), r.list("API_KEY_HASHES"), r.str("API_KEYS_FILE", "")),
            rate_limit_rps=r.float("RATE_LIMIT_RPS", d.rate_limit_rps, minimum=0.0),
            rate_limit_burst=r.int("RATE_LIMIT_BURST", d.rate_limit_burst, minimum=1),
            rate_limit_clients=r.int("RATE_LIMIT_CLIENTS", d.rate_limit_clients, minimum=1),
            models=r.list("MODELS"),
            model_profiles=_pairs("MODEL_PROFILES", r.list("MODEL_PROFILES"), MODELS),
            default_model_profile=r.choice("DEFAULT_MODEL_PROFILE", d.default_model_profile, tuple(sorted(MODELS))),
            default_hardware=r.choice("DEFAULT_HARDWARE", d.default_hardware, tuple(HARDWARE)),
            tokenizer=r.str("TOKENIZER", d.tokenizer),
            tokenize_thread_chars=r.int("TOKENIZE_THREAD_CHARS", d.tokenize_thread_chars, minimum=0),
            token_cache_bytes=r.int("TOKEN_CACHE_BYTES", d.token_cache_bytes, minimum=0),
            token_cache_chunk_chars=r.int("TOKEN_CACHE_CHUNK_CHARS", d.token_cache_chunk_chars, minimum=1),
            token_cache_verify_fraction=r.float(
                "TOKEN_CACHE_VERIFY_FRACTION", d.token_cache_verify_fraction, minimum=0.0
            ),
            chat_template=r.str("CHAT_TEMPLATE", d.chat_template),
            max_prompt_tokens=r.int("MAX_PROMPT_TOKENS", d.max_prompt_tokens, minimum=0),
            default_max_tokens=r.int("DEFAULT_MAX_TOKENS", d.default_max_tokens, minimum=1),
            block_size=r.int("BLOCK_SIZE", d.block_size, minimum=1),
            policy=r.choice("POLICY", d.policy, tuple(sorted(POLICIES))),
            threshold_tokens=r.int("THRESHOLD_TOKENS", None, minimum=0),
            transport=r.choice("TRANSPORT", d.transport, TRANSPORTS),
            link_capacities=_capacities(r.list("LINK_CAPACITIES")),
            default_link_capacity_gbps=r.float(
                "DEFAULT_LINK_CAPACITY_GBPS", d.default_link_capacity_gbps, minimum=0.001
            ),
            index_timeout_s=r.float("INDEX_TIMEOUT_S", d.index_timeout_s, minimum=0.001),
            index_min_timeout_s=r.float("INDEX_MIN_TIMEOUT_S", d.index_min_timeout_s, minimum=0.001),
            reserve_timeout_s=r.float("RESERVE_TIMEOUT_S", d.reserve_timeout_s, minimum=0.01),
            accept_timeout_s=r.float("ACCEPT_TIMEOUT_S", d.accept_timeout_s, minimum=0.01),
            first_token_timeout_s=r.float("FIRST_TOKEN_TIMEOUT_S", d.first_token_timeout_s, minimum=0.0),
            token_timeout_s=r.float("TOKEN_TIMEOUT_S", d.token_timeout_s, minimum=0.01),
            resend_after_s=r.float("RESEND_AFTER_S", d.resend_after_s, minimum=0.01),
            job_timeout_s=r.float("JOB_TIMEOUT_S", d.job_timeout_s, minimum=0.1),
            lease_min_s=r.float("LEASE_MIN_S", d.lease_min_s, minimum=0.01),
            lease_margin=r.float("LEASE_MARGIN", d.lease_margin, minimum=1.0),
            max_attempts=r.int("MAX_ATTEMPTS", d.max_attempts, minimum=1),
            instance_ttl_s=r.float("INSTANCE_TTL_S", d.instance_ttl_s, minimum=0.1),
            pending_ttl_s=r.float("PENDING_TTL_S", d.pending_ttl_s, minimum=0.1),
            replan_interval_s=r.float("REPLAN_INTERVAL_S", d.replan_interval_s, minimum=0.0),
            replan_history=r.int("REPLAN_HISTORY", d.replan_history, minimum=1),
            max_body_bytes=r.int("MAX_BODY_BYTES", d.max_body_bytes, minimum=1024),
            max_line_bytes=r.int("MAX_LINE_BYTES", d.max_line_bytes, minimum=256),
            max_header_bytes=r.int("MAX_HEADER_BYTES", d.max_header_bytes, minimum=256),
            max_headers=r.int("MAX_HEADERS", d.max_headers, minimum=8),
            idle_timeout_s=r.float("IDLE_TIMEOUT_S", d.idle_timeout_s, minimum=0.1),
            max_connections=r.int("MAX_CONNECTIONS", d.max_connections, minimum=1),
            read_timeout_s=r.float("READ_TIMEOUT_S", d.read_timeout_s, minimum=0.01),
            write_timeout_s=r.float("WRITE_TIMEOUT_S", d.write_timeout_s, minimum=0.01),
            retry_after_s=r.int("RETRY_AFTER_S", d.retry_after_s, minimum=0),
            decisions_max_age_s=r.float("DECISIONS_MAX_AGE_S", d.decisions_max_age_s, minimum=1.0),
            decisions_max_bytes=r.int("DECISIONS_MAX_BYTES", d.decisions_max_bytes, minimum=1 << 20),
            connect_timeout_s=r.float("CONNECT_TIMEOUT_S", d.connect_timeout_s, minimum=0.1),
            stop_timeout_s=r.float("STOP_TIMEOUT_S", d.stop_timeout_s, minimum=0.1),
            ready_timeout_s=r.float("READY_TIMEOUT_S", d.ready_timeout_s, minimum=0.01),
            ready_requires_kv_path=r.bool("READY_REQUIRES_KV_PATH", d.ready_requires_kv_path),
            settle_wait_s=r.float("SETTLE_WAIT_S", d.settle_wait_s, minimum=0.0),
            breaker=_breaker(r, d.breaker),
            request_limits=_request_limits(r, d.request_limits),
            log_level=r.log_level(d.log_level),
        )
