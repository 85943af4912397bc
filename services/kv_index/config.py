"""Configuration of the KV index service, from ``KV_INDEX_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from libs.common import subjects
from libs.common.config import EnvReader
from libs.common.errors import ConfigError
from libs.common.hashing import DEFAULT_BLOCK_SIZE

_ZMQ_SCHEMES = ("tcp://", "ipc://", "inproc://")


@dataclass(frozen=True)
class ZmqEndpoint:
    """An engine's KV event publisher, its replay socket if any, and the instance it belongs to."""

    url: str
    site: str
    instance: str
    replay_url: str | None = None


def parse_zmq_endpoints(raw: tuple[str, ...], key: str = "KV_INDEX_ZMQ_ENDPOINTS") -> tuple[ZmqEndpoint, ...]:
    """Parse ``tcp://host:port[|tcp://host:replay_port]=site/instance`` items."""
    endpoints = []
    seen: set[tuple[str, str]] = set()
    for item in raw:
        urls, sep, who = item.rpartition("=")
        site, slash, instance = who.partition("/")
        url, bar, replay_url = urls.partition("|")
        if (
            not sep
            or not slash
            or not url.startswith(_ZMQ_SCHEMES)
            or (bar and not replay_url.startswith(_ZMQ_SCHEMES))
        ):
            raise ConfigError(
                f"{key}: {item!r} is not of the form tcp://host:port[|tcp://host:replay_port]=site/instance"
            )
        try:
            endpoint = ZmqEndpoint(
                url, subjects.token(site, "site"), subjects.token(instance, "instance"), replay_url or None
            )
        except ValueError as e:
            raise ConfigError(f"{key}: {item!r}: {e}") from None
        if (endpoint.site, endpoint.instance) in seen:
            raise ConfigError(f"{key}: {item!r}: {site}/{instance} is named twice")
        seen.add((endpoint.site, endpoint.instance))
        endpoints.append(endpoint)
    return tuple(endpoints)


@dataclass(frozen=True)
class KvIndexConfig:
    """Everything the KV index service needs to know; deadlines in seconds."""

    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "prfaas:kv:"
    stream: str = subjects.KV_EVENTS_STREAM
    durable: str = "kv-index"
    stream_max_age_s: float = 24 * 3600.0
    block_size: int = DEFAULT_BLOCK_SIZE
    lookup_timeout_s: float = 0.5
    redis_timeout_s: float = 0.5
    instance_ttl_s: float = 10.0
    forget_after_s: float = 3600.0
    fetch_batch: int = 256
    fetch_timeout_s: float = 0.5
    retry_backoff_max_s: float = 1.0
    snapshot_request_interval_s: float = 5.0
    zmq_endpoints: tuple[ZmqEndpoint, ...] = ()
    zmq_heartbeat_s: float = 2.0
    zmq_replay_timeout_s: float = 5.0
    connect_timeout_s: float = 5.0
    stop_timeout_s: float = 5.0  # each step of a stop (subscriptions, owned tasks, the final flush) gets this long
    max_concurrent_lookups: int = 64
    metrics_port: int = 0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KvIndexConfig:
        """Read ``KV_INDEX_<FIELD>`` variables; unset ones keep their defaults."""
        r = EnvReader("KV_INDEX_", os.environ if env is None else env)
        d = cls()
        return cls(
            nats_url=r.nats_url(d.nats_url),
            redis_url=r.url("REDIS_URL", d.redis_url, ("redis://", "rediss://", "unix://")),
            key_prefix=r.str("KEY_PREFIX", d.key_prefix),
            stream=r.str("STREAM", d.stream),
            durable=r.str("DURABLE", d.durable),
            stream_max_age_s=r.float("STREAM_MAX_AGE_S", d.stream_max_age_s, minimum=1.0),
            block_size=r.int("BLOCK_SIZE", d.block_size, minimum=1),
            lookup_timeout_s=r.float("LOOKUP_TIMEOUT_S", d.lookup_timeout_s, minimum=0.01),
            redis_timeout_s=r.float("REDIS_TIMEOUT_S", d.redis_timeout_s, minimum=0.01),
            instance_ttl_s=r.float("INSTANCE_TTL_S", d.instance_ttl_s, minimum=0.1),
            forget_after_s=r.float("FORGET_AFTER_S", d.forget_after_s, minimum=1.0),
            fetch_batch=r.int("FETCH_BATCH", d.fetch_batch, minimum=1),
            fetch_timeout_s=r.float("FETCH_TIMEOUT_S", d.fetch_timeout_s, minimum=0.01),
            retry_backoff_max_s=r.float("RETRY_BACKOFF_MAX_S", d.retry_backoff_max_s, minimum=0.01),
            snapshot_request_interval_s=r.float(
                "SNAPSHOT_REQUEST_INTERVAL_S", d.snapshot_request_interval_s, minimum=0.0
            ),
            zmq_endpoints=parse_zmq_endpoints(r.list("ZMQ_ENDPOINTS")),
            zmq_heartbeat_s=r.float("ZMQ_HEARTBEAT_S", d.zmq_heartbeat_s, minimum=0.05),
            zmq_replay_timeout_s=r.float("ZMQ_REPLAY_TIMEOUT_S", d.zmq_replay_timeout_s, minimum=0.01),
            connect_timeout_s=r.float("CONNECT_TIMEOUT_S", d.connect_timeout_s, minimum=0.1),
            stop_timeout_s=r.float("STOP_TIMEOUT_S", d.stop_timeout_s, minimum=0.1),
            max_concurrent_lookups=r.int("MAX_CONCURRENT_LOOKUPS", d.max_concurrent_lookups, minimum=1),
            metrics_port=r.int("METRICS_PORT", d.metrics_port, minimum=0),
            log_level=r.log_level(d.log_level),
        )
