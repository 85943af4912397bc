"""The emulated link behaves like TCP over the path: a handshake RTT, slow start from 10 segments, restart after idle."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from libs.common.errors import ConfigError
from libs.lab.servers import free_port
from libs.lab.topology import parse_topology, topology_path
from libs.lab.wan import Forward, LinkRelay
from libs.lab.wan_probe import LinkedPair
from libs.lab.wan_tcp_model import delivery_time_s

LOCAL = "127.0.0.1"
MIB = 1024 * 1024


@pytest.fixture
def target() -> Iterator[socket.socket]:
    """A listener at the far site."""
    s = socket.create_server((LOCAL, 0))
    s.settimeout(10.0)
    yield s
    s.close()


def _relay(target: socket.socket, **figures) -> tuple[LinkRelay, tuple[str, int]]:
    port = free_port()
    forward = Forward("dc-a", (LOCAL, port), (LOCAL, target.getsockname()[1]))
    return LinkRelay(("dc-a", "dc-b"), forwards=[forward], **figures).start(), (LOCAL, port)


def test_a_new_connection_pays_one_rtt_before_its_first_byte_crosses(target: socket.socket) -> None:
    """At 40 ms RTT the target is connected after 20 ms; a byte sent at connect lands at 60 ms; the reply at 80 ms."""
    relay, address = _relay(target, gbps=1.0, rtt_ms=40.0)
    try:
        t0 = time.monotonic()
        with socket.create_connection(address, timeout=5.0) as client:
            client.sendall(b"x")
            server, _ = target.accept()
            accepted_s = time.monotonic() - t0
            with server:
                server.settimeout(5.0)
                server.sendall(b"y")  # at once, as a server greeting its client (NATS's INFO)
                assert server.recv(1) == b"x"
                first_byte_s = time.monotonic() - t0
                assert client.recv(1) == b"y"
                reply_s = time.monotonic() - t0
        # Lower bounds: SYN after one way; data after the SYN/SYN-ACK round trip and one way; the
        # server's bytes after the client's ACK reached it, then one way back. Upper bounds: 20 ms
        # of thread wake-ups on a loaded 2-core machine, under the 40 ms one more round trip adds.
        assert 0.020 <= accepted_s <= 0.040
        assert 0.060 <= first_byte_s <= 0.080
        assert 0.080 <= reply_s <= 0.100
    finally:
        relay.stop()


def test_a_refused_connect_reaches_the_client_one_rtt_after_it() -> None:
    """A target that refuses (nothing listens) is seen by the client as the end of its connection 40 ms after it."""
    port = free_port()  # nothing listens there: connecting is refused
    forward = Forward("dc-a", (LOCAL, free_port()), (LOCAL, port))
    relay = LinkRelay(("dc-a", "dc-b"), forwards=[forward], gbps=1.0, rtt_ms=40.0).start()
    address = forward.listen
    try:
        t0 = time.monotonic()
        with socket.create_connection(address, timeout=5.0) as client:
            try:
                assert client.recv(1) == b""  # the relay ends it (FIN, then RST)
            except ConnectionResetError:
                pass
        # Lower bound: the SYN's way out and the RST's way back. Upper: 20 ms of wake-ups on a loaded
        # 2-core machine, under the 40 ms of one more round trip.
        assert 0.040 <= time.monotonic() - t0 <= 0.060
    finally:
        relay.stop()


def test_a_cold_transfer_takes_the_tcp_models_time(target: socket.socket) -> None:
    """4 MiB on a new connection over 1 Gbps / 20 ms: handshake, 8 slow-start rounds, the rest at line rate (~194 ms)."""
    relay, address = _relay(target, gbps=1.0, rtt_ms=20.0)
    try:
        model = delivery_time_s(4 * MIB, gbps=1.0, rtt_s=0.020)
        with LinkedPair(address, target) as pair:
            took = pair.transfer_s(4 * MIB, since=pair.opened_at)
        # Without a window it would take 64 ms, without the handshake 174 ms. Lower bound: the
        # link's 5 ms burst credit. Upper: each of 9 rounds may lose a few ms to scheduling on a
        # loaded 2-core machine (the benchmark holds the median within 10%).
        assert 0.93 * model <= took <= 1.25 * model
    finally:
        relay.stop()


def test_after_idle_past_the_rto_a_warm_connection_slow_starts_again_unless_turned_off(target: socket.socket) -> None:
    """0.5 s idle at 20 ms RTT (RTO 220 ms): 8 MiB restart from 10 segments (~208 ms); with the option off, line rate (~77 ms)."""
    relay, address = _relay(target, gbps=1.0, rtt_ms=20.0)
    try:
        restarted_model = delivery_time_s(8 * MIB, gbps=1.0, rtt_s=0.020, handshake=False)
        open_model = delivery_time_s(8 * MIB, gbps=1.0, rtt_s=0.020, handshake=False, cwnd_bytes=32 * MIB)
        with LinkedPair(address, target) as pair:
            pair.transfer_s(8 * MIB)  # opens the window past the 2.5 MB bandwidth-delay product
            time.sleep(0.5)  # the idle period under test
            restarted = pair.transfer_s(8 * MIB)
            relay.configure(slow_start_after_idle=False)
            time.sleep(0.5)
            kept = pair.transfer_s(8 * MIB)
        # Bounds as in the cold test. An open window is never early: an idle link banks no credit
        # (1% for timer granularity); the upper bound allows 19 ms of stalls, a restart costs 130 ms.
        assert 0.93 * restarted_model <= restarted <= 1.25 * restarted_model
        assert 0.99 * open_model <= kept <= 1.25 * open_model
    finally:
        relay.stop()


def test_a_one_byte_keepalive_every_100_ms_keeps_the_window_open(target: socket.socket) -> None:
    """At 20 ms RTT a byte every 100 ms through an otherwise idle second keeps the window: 8 MiB then go at line rate."""
    relay, address = _relay(target, gbps=1.0, rtt_ms=20.0)
    try:
        open_model = delivery_time_s(8 * MIB, gbps=1.0, rtt_s=0.020, handshake=False, cwnd_bytes=32 * MIB)
        with LinkedPair(address, target) as pair:
            pair.transfer_s(8 * MIB)
            start = time.monotonic()
            for tick in range(1, 11):
                pair.transfer_s(1)
                time.sleep(max(0.0, start + tick * 0.100 - time.monotonic()))  # the keepalive interval under test
            kept = pair.transfer_s(8 * MIB)
        assert 0.99 * open_model <= kept <= 1.25 * open_model  # bounds as in the idle test; a restart costs 2.7x
    finally:
        relay.stop()


def test_a_receive_window_caps_a_connection_at_window_per_rtt(target: socket.socket) -> None:
    """A 256 KiB window at 20 ms RTT holds a connection to ~105 Mbps on a 1 Gbps link: 4 MiB take the model's ~0.4 s."""
    relay, address = _relay(target, gbps=1.0, rtt_ms=20.0, window_bytes=256 * 1024)
    try:
        model = delivery_time_s(4 * MIB, gbps=1.0, rtt_s=0.020, window_bytes=256 * 1024)
        with LinkedPair(address, target) as pair:
            took = pair.transfer_s(4 * MIB, since=pair.opened_at)
        assert 0.93 * model <= took <= 1.25 * model  # bounds as in the cold test (20 rounds here)
    finally:
        relay.stop()


def test_a_topology_link_can_turn_slow_start_after_idle_off() -> None:
    """``slow_start_after_idle = false`` under ``[[links]]`` is read (default true); a non-boolean names the key."""
    default = topology_path("default").read_text()
    assert parse_topology(default, source="lab.toml").links[0].slow_start_after_idle is True
    tuned = default.replace("loss_pct = 0.0", "loss_pct = 0.0\nslow_start_after_idle = false", 1)
    assert parse_topology(tuned, source="lab.toml").links[0].slow_start_after_idle is False
    with pytest.raises(ConfigError, match=r"links\[0\]\.slow_start_after_idle: expected `bool`"):
        parse_topology(tuned.replace("slow_start_after_idle = false", "slow_start_after_idle = 0"), source="lab.toml")
