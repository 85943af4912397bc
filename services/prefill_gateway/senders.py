"""Which KV sender a transfer uses: direct TCP striped over several connections (one when small), or JetStream."""

from __future__ import annotations

import dataclasses

from nats.aio.client import Client as NatsClient

from libs.common.pki import client_context
from libs.kvwire import JetStreamTransport, KvLinks, KvSender, SenderConfig, TcpConfig, TcpTransport
from services.prefill_gateway.config import PrefillGatewayConfig


class Senders:
    """The gateway's KV senders, sharing its links' pacing budgets and one pool of TCP connections."""

    def __init__(self, nc: NatsClient, links: KvLinks, config: PrefillGatewayConfig) -> None:
        sender_config = SenderConfig(max_attempts=config.send_attempts)
        tcp = TcpConfig(
            connections=config.tcp_connections,
            pool=config.tcp_pool,
            pool_idle_s=config.tcp_pool_idle_s,
            keepalive_s=config.tcp_keepalive_s,
            tls=client_context(config.kv_tls) if config.kv_tls is not None else None,
        )
        self._tcp = TcpTransport(tcp)
        self._by_transport = {
            "tcp": KvSender(self._tcp, links, sender_config),
            "jetstream": KvSender(JetStreamTransport(nc), links, sender_config),
        }
        small = TcpTransport(dataclasses.replace(tcp, connections=1), pool=self._tcp.pool)
        self._small_tcp = KvSender(small, links, sender_config)
        self._small_bytes = config.tcp_small_bytes

    def __contains__(self, transport: str) -> bool:
        return transport in self._by_transport

    def of(self, transport: str) -> KvSender:
        """The striped sender of ``transport`` (what aborts use)."""
        return self._by_transport[transport]

    def pick(self, transport: str, payload_bytes: int) -> KvSender:
        """The sender of a transfer: direct TCP over one connection when it is small, else striped."""
        if transport == "tcp" and payload_bytes < self._small_bytes:
            return self._small_tcp
        return self._by_transport[transport]

    async def close(self) -> None:
        """Close the TCP connections kept for later transfers."""
        await self._tcp.close()
