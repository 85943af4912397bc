"""Prometheus metrics of a prefill gateway (one registry per service object)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
_GBPS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 200.0, 400.0)
_PAIR = ("src_site", "dst_site")


class PrefillGatewayMetrics:
    """Counters, gauges and histograms a prefill gateway updates."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter("prfaas_prefill_gateway_jobs", "Prefill jobs by outcome", ["outcome"], registry=registry)
        self.bad_messages = Counter(
            "prfaas_prefill_gateway_bad_messages", "Undecodable messages", ["subject"], registry=registry
        )
        self.queue_depth = Gauge(
            "prfaas_prefill_gateway_queue_depth", "Jobs queued or running", ["instance"], registry=registry
        )
        self.failures = Counter(
            "prfaas_prefill_gateway_failures", "Jobs ended by an error", ["code"], registry=registry
        )
        self.sent_bytes = Counter(
            "prfaas_prefill_gateway_sent_bytes",
            "KV bytes put on the wire per site pair",
            _PAIR,
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "prfaas_prefill_gateway_queue_seconds", "Receipt to compute", buckets=_SECONDS, registry=registry
        )
        self.prefill_seconds = Histogram(
            "prfaas_prefill_gateway_prefill_seconds", "Compute", buckets=_SECONDS, registry=registry
        )
        self.transfer_seconds = Histogram(
            "prfaas_prefill_gateway_transfer_seconds",
            "Manifest to verified end, per site pair",
            _PAIR,
            buckets=_SECONDS,
            registry=registry,
        )
        self.goodput_gbps = Histogram(
            "prfaas_prefill_gateway_goodput_gbps",
            "A transfer's KV wire bytes delivered (each once) over its whole duration, per site pair",
            _PAIR,
            buckets=_GBPS,
            registry=registry,
        )
        self.exposed_seconds = Histogram(
            "prfaas_prefill_gateway_exposed_transfer_seconds",
            "End of compute to verified end",
            buckets=_SECONDS,
            registry=registry,
        )
        self.cached_tokens = Counter(
            "prfaas_prefill_gateway_cached_tokens", "Prompt tokens reused from the cache", registry=registry
        )
