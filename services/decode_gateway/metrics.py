"""Prometheus metrics of a decode gateway (one registry per service object)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class DecodeGatewayMetrics:
    """Counters, gauges and histograms a decode gateway updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter("prfaas_decode_gateway_jobs", "Decode jobs by outcome", ["outcome"], registry=registry)
        self.bad_messages = Counter(
            "prfaas_decode_gateway_bad_messages", "Undecodable messages", ["subject"], registry=registry
        )
        self.reservations = Gauge("prfaas_decode_gateway_reservations", "Requests holding a slot", registry=registry)
        self.reserved_bytes = Gauge(
            "prfaas_decode_gateway_reserved_bytes", "Receiver bytes reserved for transfers not begun", registry=registry
        )
        self.leases_expired = Counter(
            "prfaas_decode_gateway_leases_expired", "Reservations expired without KV progress", registry=registry
        )
        self.failures = Counter("prfaas_decode_gateway_failures", "Jobs ended by an error", ["code"], registry=registry)
        self.received_bytes = Counter(
            "prfaas_decode_gateway_received_bytes",
            "KV bytes received per site pair",
            ["src_site", "dst_site"],
            registry=registry,
        )
        self.held_tokens = Counter(
            "prfaas_decode_gateway_held_tokens", "Prompt tokens whose KV was held (not sent)", registry=registry
        )
        self.kv_wait_seconds = Histogram(
            "prfaas_decode_gateway_kv_wait_seconds",
            "Reservation to the transfer's begin",
            buckets=_SECONDS,
            registry=registry,
        )
        self.transfer_seconds = Histogram(
            "prfaas_decode_gateway_transfer_seconds",
            "Transfer begin to a complete state",
            buckets=_SECONDS,
            registry=registry,
        )
        self.first_token_seconds = Histogram(
            "prfaas_decode_gateway_first_token_seconds",
            "Reservation to the first token",
            buckets=_SECONDS,
            registry=registry,
        )
        self.decode_seconds = Histogram(
            "prfaas_decode_gateway_decode_seconds", "First token to the last", buckets=_SECONDS, registry=registry
        )
        self.tokens = Counter("prfaas_decode_gateway_tokens", "Tokens streamed", registry=registry)
