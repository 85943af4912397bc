"""Fixtures that start real nats-server and redis-server processes on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.common.telemetry import setup_tracing
from libs.lab.servers import NatsServer, RedisServer, Supercluster
from tests.otlp_receiver import OtlpReceiver

TWO_SITES = ("dc-prfaas", "dc-pd")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh single nats-server with JetStream (``.url``; ``stop()``/``start()`` to restart)."""
    server = NatsServer(workdir=tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """URL of a fresh single nats-server."""
    return nats_server.url


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server without persistence (``.url``; ``stop()``/``start()`` for outages)."""
    server = RedisServer(workdir=tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a fresh redis-server."""
    return redis_server.url


@pytest.fixture(scope="session")
def supercluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supercluster]:
    """Two sites (``TWO_SITES``) joined by gateways, shared by the session (it takes seconds to form)."""
    cluster = Supercluster(list(TWO_SITES), workdir=tmp_path_factory.mktemp("supercluster")).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def otlp() -> Iterator[tuple[OtlpReceiver, object]]:
    """An OTLP/HTTP receiver and the process-wide tracer provider exporting to it (set once per process).

    Call ``provider.force_flush`` from a thread (``asyncio.to_thread``), then ``receiver.take()``.
    """
    receiver = OtlpReceiver().start()
    provider = setup_tracing("prfaas-tests", env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    try:
        yield receiver, provider
    finally:
        provider.shutdown()
        receiver.stop()
