"""Configuration of a decode gateway, from ``DECODE_GATEWAY_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from libs.common import subjects
from libs.common.config import EnvReader
from libs.common.errors import ConfigError
from libs.common.messages import TRANSPORTS
from libs.common.pki import CertFiles
from libs.engine.build import BackendSpec
from libs.kvwire.sockets import tls_files

PREFIX = "DECODE_GATEWAY_"


def _decode_backend(spec: BackendSpec) -> BackendSpec:
    """The spec, if its chip can decode the model at the asked batch; else a ConfigError saying why."""
    limit = spec.decode_limit()
    hardware = spec.hardware
    if hardware is not None and hardware.prefill_only:
        raise ConfigError(
            f"{PREFIX}BACKEND={spec.backend!r}: {hardware.chip} is a prefill-only chip and cannot "
            f"host a decode instance; use it in a prefill gateway"
        )
    if limit == 0:
        raise ConfigError(
            f"{PREFIX}BACKEND={spec.backend!r}: {spec.model} does not fit {spec.hardware_name} "
            f"for decode (weights over memory)"
        )
    if spec.max_batch > limit:
        detail = ""
        if hardware is not None:
            step_ms = spec.model_profile.decode_step_s(limit, hardware) * 1e3
            kind = "the chip's own limit: small batches, fast " if limit == hardware.max_decode_batch else ""
            detail = f" ({kind}steps of {step_ms:.1f} ms at that batch)"
        raise ConfigError(
            f"{PREFIX}MAX_BATCH={spec.max_batch}: {spec.backend} decodes at most {limit} sequences "
            f"of {spec.model_name} per step{detail}"
        )
    return spec


def _advertise_by_site(items: tuple[str, ...]) -> Mapping[str, tuple[str, int]]:
    """``site=host:port`` items (``DECODE_GATEWAY_ADVERTISE_BY_SITE``)."""
    found = {}
    for item in items:
        site, sep, address = item.partition("=")
        host, colon, port = address.rpartition(":")
        if not sep or not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"{PREFIX}ADVERTISE_BY_SITE={','.join(items)!r}: {item!r} is not of the form <site>=<host>:<port>"
            )
        try:
            found[subjects.token(site.strip(), "site")] = (host, int(port))
        except ValueError as e:
            raise ConfigError(f"{PREFIX}ADVERTISE_BY_SITE={','.join(items)!r}: {e}") from None
    return MappingProxyType(found)


@dataclass(frozen=True)
class DecodeGatewayConfig:
    """Everything a decode gateway needs; sizes in bytes, deadlines in seconds."""

    site: str = "dc-pd"
    instance: str = "decode-0"
    cluster: str = "pd"
    nats_url: str = "nats://127.0.0.1:4222"
    backend: BackendSpec = BackendSpec()
    tcp_host: str = "127.0.0.1"
    tcp_port: int = 0  # 0: any free port (announced in reservations and heartbeats)
    advertise_host: str = ""  # host senders connect to ("": tcp_host)
    kv_tls: CertFiles | None = None  # KV_TLS_CERT, _KEY, _CA: mutual TLS on the KV listener (all three, or none)
    kv_io_timeout_s: float = 60.0  # a KV connection silent between frames, or stalled in a payload, this long is cut
    kv_header_timeout_s: float = 5.0  # a KV frame header (or TLS handshake) still incomplete this long is cut
    kv_max_connections: int = 256  # KV connections open at once; more are closed as soon as accepted
    # Where senders of one prefill site reach the receiver (a relay or NAT in between), else advertise_host:port.
    advertise_by_site: Mapping[str, tuple[str, int]] = field(default_factory=lambda: MappingProxyType({}))
    transports: tuple[str, ...] = TRANSPORTS
    kv_memory_bytes: int = 1 << 30  # receiver arena: transfers in progress and reservations
    max_transfer_bytes: int = 1 << 30
    lease_s: float = 10.0  # a reservation without KV progress for this long expires
    lease_margin: float = 2.0  # once KV flows, the lease covers this many times the sender's predicted longest gap
    progress_poll_s: float = 0.01  # how often reservations are checked for progress and leases
    transfer_timeout_s: float = 120.0  # receiver-side deadline from a transfer's begin to its end
    heartbeat_s: float = 0.5
    resend_keep_s: float = 30.0  # how long a request's sent tokens are kept after it ended, to send again if lost
    drain_timeout_s: float = 30.0  # on SIGTERM: in-flight requests get this long to finish
    connect_timeout_s: float = 5.0
    stop_timeout_s: float = 5.0  # each step of a stop (subscriptions, owned tasks, the final flush) gets this long
    metrics_port: int = 0
    log_level: str = "INFO"

    @property
    def host(self) -> str:
        """Host announced to senders."""
        return self.advertise_host or self.tcp_host

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DecodeGatewayConfig:
        """Read ``DECODE_GATEWAY_<FIELD>`` variables; unset ones keep their defaults."""
        r = EnvReader(PREFIX, os.environ if env is None else env)
        d = cls()
        transports = r.list("TRANSPORTS", d.transports)
        if not transports or any(t not in TRANSPORTS for t in transports):
            raise ConfigError(
                f"{PREFIX}TRANSPORTS={','.join(transports)!r}: expected a list of {', '.join(TRANSPORTS)}"
            )
        kv_memory = r.int("KV_MEMORY_BYTES", d.kv_memory_bytes, minimum=1 << 16)
        return cls(
            site=r.name("SITE", d.site),
            instance=r.name("INSTANCE", d.instance),
            cluster=r.name("CLUSTER", d.cluster),
            nats_url=r.nats_url(d.nats_url),
            backend=_decode_backend(BackendSpec.from_env(r)),
            tcp_host=r.str("TCP_HOST", d.tcp_host),
            tcp_port=r.int("TCP_PORT", d.tcp_port, minimum=0),
            advertise_host=r.str("ADVERTISE_HOST", d.advertise_host),
            kv_tls=tls_files(r),
            kv_io_timeout_s=r.float("KV_IO_TIMEOUT_S", d.kv_io_timeout_s, minimum=0.1),
            kv_header_timeout_s=r.float("KV_HEADER_TIMEOUT_S", d.kv_header_timeout_s, minimum=0.1),
            kv_max_connections=r.int("KV_MAX_CONNECTIONS", d.kv_max_connections, minimum=1),
            advertise_by_site=_advertise_by_site(r.list("ADVERTISE_BY_SITE")),
            transports=transports,
            kv_memory_bytes=kv_memory,
            max_transfer_bytes=r.int("MAX_TRANSFER_BYTES", min(d.max_transfer_bytes, kv_memory), minimum=1),
            lease_s=r.float("LEASE_S", d.lease_s, minimum=0.01),
            lease_margin=r.float("LEASE_MARGIN", d.lease_margin, minimum=1.0),
            progress_poll_s=r.float("PROGRESS_POLL_S", d.progress_poll_s, minimum=0.001),
            transfer_timeout_s=r.float("TRANSFER_TIMEOUT_S", d.transfer_timeout_s, minimum=0.1),
            heartbeat_s=r.float("HEARTBEAT_S", d.heartbeat_s, minimum=0.01),
            resend_keep_s=r.float("RESEND_KEEP_S", d.resend_keep_s, minimum=0.0),
            drain_timeout_s=r.float("DRAIN_TIMEOUT_S", d.drain_timeout_s, minimum=0.0),
            connect_timeout_s=r.float("CONNECT_TIMEOUT_S", d.connect_timeout_s, minimum=0.1),
            stop_timeout_s=r.float("STOP_TIMEOUT_S", d.stop_timeout_s, minimum=0.1),
            metrics_port=r.int("METRICS_PORT", d.metrics_port, minimum=0),
            log_level=r.log_level(d.log_level),
        )
