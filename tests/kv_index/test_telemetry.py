"""Traces cross the bus (context in NATS headers, exported over OTLP/HTTP) and /metrics serves counters."""

from __future__ import annotations

import asyncio
import urllib.request

from opentelemetry import trace

from libs.common.hashing import hash_list
from libs.common.telemetry import start_metrics_server
from libs.lab.servers import free_port


async def test_lookup_span_joins_the_callers_trace(otlp, index, client):
    """A lookup made inside a client span is exported by the index as a child in the same trace."""
    receiver, provider = otlp
    receiver.take()
    with trace.get_tracer("test").start_as_current_span("router.route") as parent:
        await client.lookup(hash_list(list(range(128))))
    await asyncio.to_thread(provider.force_flush)  # blocks on the HTTP export: keep it off the loop
    by_name = {s.name: s for s in receiver.take()}
    trace_id = format(parent.get_span_context().trace_id, "032x")
    assert by_name["router.route"].trace_id == trace_id
    assert by_name["kv_index.lookup"].trace_id == trace_id
    assert by_name["kv_index.lookup"].parent_span_id == by_name["router.route"].span_id


async def test_metrics_endpoint_serves_the_service_counters(index, client):
    """The Prometheus endpoint shows lookups counted by outcome."""
    await client.lookup(hash_list(list(range(64))))
    port = free_port()
    server = start_metrics_server(port, addr="127.0.0.1", registry=index.registry)
    try:
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
    finally:
        server.shutdown()
    assert 'prfaas_kv_index_lookups_total{outcome="ok"} 1.0' in body
