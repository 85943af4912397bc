"""Configuration of a prefill gateway, from ``PREFILL_GATEWAY_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from libs.common import subjects
from libs.common.config import EnvReader
from libs.common.errors import ConfigError
from libs.common.pki import CertFiles
from libs.engine.build import BackendSpec
from libs.kvwire.sockets import tls_files

PREFIX = "PREFILL_GATEWAY_"
CODECS = ("raw", "zstd", "int8")


def _token(key: str, value: str) -> str:
    """One name inside a list setting (``INSTANCES``, a site of ``BUDGETS``)."""
    try:
        return subjects.token(value, key.lower())
    except ValueError as e:
        raise ConfigError(f"{PREFIX}{key}={value!r}: {e}") from None


def _budgets(items: tuple[str, ...]) -> Mapping[str, float]:
    """``site=gbps`` items as a mapping (``PREFILL_GATEWAY_BUDGETS``)."""
    budgets = {}
    for item in items:
        site, sep, value = item.partition("=")
        try:
            gbps = float(value)
        except ValueError:
            gbps = -1.0
        if not sep or gbps < 0:
            raise ConfigError(f"{PREFIX}BUDGETS={','.join(items)!r}: {item!r} is not of the form <site>=<Gbps >= 0>")
        budgets[_token("BUDGETS", site.strip())] = gbps
    return MappingProxyType(budgets)


@dataclass(frozen=True)
class PrefillGatewayConfig:
    """Everything a prefill gateway needs; deadlines in seconds, budgets in Gbit/s."""

    site: str = "dc-prfaas"
    cluster: str = "prfaas"
    instances: tuple[str, ...] = ("prefill-0",)
    nats_url: str = "nats://127.0.0.1:4222"
    backend: BackendSpec = BackendSpec()
    queue_limit: int = 16  # jobs queued or computing per instance; more are refused with no_capacity
    codec: str = "raw"  # attn_kv codec when the job names none (float parts only)
    layerwise: bool = True  # stream each layer's parts as it is done (False: the whole state after the prefill)
    budgets_gbps: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))  # per destination site
    default_budget_gbps: float = 0.0  # other destination sites (0: unpaced)
    tcp_connections: int = 4  # connections striping one transfer's chunks (large transfers)
    tcp_small_bytes: int = 16 << 20  # transfers smaller than this use one connection (no setup of the others)
    tcp_pool: bool = True  # keep KV connections open between transfers, per decode endpoint (host, port)
    tcp_pool_idle_s: float = 60.0  # a kept connection no transfer claimed for this long is closed
    tcp_keepalive_s: float = 0.1  # a KV connection with nothing to send for this long sends 4 bytes (0: never)
    kv_tls: CertFiles | None = None  # KV_TLS_CERT, _KEY, _CA: mutual TLS to decode sites' KV listeners (all, or none)
    send_attempts: int = 4  # sessions per transfer: the first and the resumes after broken connections
    abort_timeout_s: float = 2.0  # telling a receiver to drop a transfer
    link_stats_s: float = 1.0
    heartbeat_s: float = 0.5
    suspended_s: float = 5.0  # the process did not run this long (stopped): jobs received before end (0: never)
    drain_timeout_s: float = 30.0  # on SIGTERM: jobs in flight get this long to finish
    connect_timeout_s: float = 5.0
    stop_timeout_s: float = 5.0  # each step of a stop (subscriptions, owned tasks, the final flush) gets this long
    metrics_port: int = 0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PrefillGatewayConfig:
        """Read ``PREFILL_GATEWAY_<FIELD>`` variables; unset ones keep their defaults."""
        r = EnvReader(PREFIX, os.environ if env is None else env)
        d = cls()
        instances = tuple(_token("INSTANCES", i) for i in r.list("INSTANCES", d.instances))
        if not instances or len(set(instances)) != len(instances):
            raise ConfigError(f"{PREFIX}INSTANCES={','.join(instances)!r}: expected distinct instance names")
        backend = BackendSpec.from_env(r)
        if not backend.simulated and len(instances) > 1:
            raise ConfigError(
                f"{PREFIX}INSTANCES={','.join(instances)!r}: a reference-model instance is one process "
                f"(several instances share a process only when simulated)"
            )
        return cls(
            site=r.name("SITE", d.site),
            cluster=r.name("CLUSTER", d.cluster),
            instances=instances,
            nats_url=r.nats_url(d.nats_url),
            backend=backend,
            queue_limit=r.int("QUEUE_LIMIT", d.queue_limit, minimum=1),
            codec=r.choice("CODEC", d.codec, CODECS),
            layerwise=r.bool("LAYERWISE", d.layerwise),
            budgets_gbps=_budgets(r.list("BUDGETS")),
            default_budget_gbps=r.float("DEFAULT_BUDGET_GBPS", d.default_budget_gbps, minimum=0.0),
            tcp_connections=r.int("TCP_CONNECTIONS", d.tcp_connections, minimum=1),
            tcp_small_bytes=r.int("TCP_SMALL_BYTES", d.tcp_small_bytes, minimum=0),
            tcp_pool=r.bool("TCP_POOL", d.tcp_pool),
            tcp_pool_idle_s=r.float("TCP_POOL_IDLE_S", d.tcp_pool_idle_s, minimum=0.01),
            tcp_keepalive_s=r.float("TCP_KEEPALIVE_S", d.tcp_keepalive_s, minimum=0.0),
            kv_tls=tls_files(r),
            send_attempts=r.int("SEND_ATTEMPTS", d.send_attempts, minimum=1),
            abort_timeout_s=r.float("ABORT_TIMEOUT_S", d.abort_timeout_s, minimum=0.01),
            link_stats_s=r.float("LINK_STATS_S", d.link_stats_s, minimum=0.01),
            heartbeat_s=r.float("HEARTBEAT_S", d.heartbeat_s, minimum=0.01),
            suspended_s=r.float("SUSPENDED_S", d.suspended_s, minimum=0.0),
            drain_timeout_s=r.float("DRAIN_TIMEOUT_S", d.drain_timeout_s, minimum=0.0),
            connect_timeout_s=r.float("CONNECT_TIMEOUT_S", d.connect_timeout_s, minimum=0.1),
            stop_timeout_s=r.float("STOP_TIMEOUT_S", d.stop_timeout_s, minimum=0.1),
            metrics_port=r.int("METRICS_PORT", d.metrics_port, minimum=0),
            log_level=r.log_level(d.log_level),
        )
