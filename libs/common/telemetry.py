"""Logging setup, OpenTelemetry tracing (OTLP/HTTP), trace context in NATS headers, /metrics."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class _StructuredFormatter(logging.Formatter):
    """``time level logger message key=value ...`` with the record's extra fields appended."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}
        if not extras:
            return base
        return base + " " + " ".join(f"{k}={v}" for k, v in sorted(extras.items()))


def setup_logging(level: str = "INFO") -> None:
    """Configure the root logger once for a service process."""
    handler = logging.StreamHandler()
    handler.setFormatter(_StructuredFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Install a tracer provider exporting over OTLP/HTTP if ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set."""
    env = os.environ if env is None else env
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")))
    trace.set_tracer_provider(provider)
    return provider


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str]:
    """Return NATS headers carrying the current trace context (W3C ``traceparent``)."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def extract_context(headers: Mapping[str, str] | None):
    """The trace context carried by a NATS message's headers (or an empty context)."""
    return propagate.extract(dict(headers or {}))


def start_metrics_server(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY):
    """Serve Prometheus ``/metrics`` on ``addr:port`` from a daemon thread; returns the server."""
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
