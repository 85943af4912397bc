"""The TCP delivery-time model: handshake, slow-start rounds from 10 segments, then size over bandwidth."""

from __future__ import annotations

import pytest

from libs.lab.wan_tcp_model import delivery_time_s

MIB = 1024 * 1024
IW = 10 * 1448


def test_a_cold_mebibyte_at_10_gbps_and_20_ms_takes_handshake_six_rounds_and_the_rest() -> None:
    """1 MiB: 1 RTT handshake, 6 full rounds (63 initial windows), the last 136,336 bytes at 10 Gbps, one way."""
    expected = 0.020 + 6 * 0.020 + (MIB - 63 * IW) / 1.25e9 + 0.010
    assert delivery_time_s(MIB, gbps=10.0, rtt_s=0.020) == pytest.approx(expected, rel=1e-12)


def test_slow_start_ends_when_the_window_covers_the_bandwidth_delay_product() -> None:
    """256 MiB at 10 Gbps / 20 ms: 11 rounds until the window passes 25 MB, then the rest back to back at line rate."""
    expected = 0.020 + 11 * 0.020 + (256 * MIB - 2047 * IW) / 1.25e9 + 0.010
    assert delivery_time_s(256 * MIB, gbps=10.0, rtt_s=0.020) == pytest.approx(expected, rel=1e-12)


def test_round_boundaries_and_the_handshake() -> None:
    """One initial window fits the first round; one byte more needs a second; an open connection skips the handshake."""
    rate = 1.25e8
    assert delivery_time_s(IW, gbps=1.0, rtt_s=0.020) == pytest.approx(0.020 + IW / rate + 0.010)
    assert delivery_time_s(IW + 1, gbps=1.0, rtt_s=0.020) == pytest.approx(0.020 + 0.020 + 1 / rate + 0.010)
    assert delivery_time_s(IW, gbps=1.0, rtt_s=0.020, handshake=False) == pytest.approx(IW / rate + 0.010)


def test_an_open_window_moves_at_line_rate_and_a_receive_window_caps_the_rate() -> None:
    """A window over the BDP: size/bandwidth plus one way; a 256 KiB receive window holds a long transfer to window/RTT."""
    assert delivery_time_s(64 * MIB, gbps=10.0, rtt_s=0.020, handshake=False, cwnd_bytes=32 * MIB) == pytest.approx(
        64 * MIB / 1.25e9 + 0.010
    )
    capped = delivery_time_s(64 * MIB, gbps=10.0, rtt_s=0.020, window_bytes=256 * 1024)
    assert capped == pytest.approx(256 * 0.020, rel=0.03)  # 256 windows of 256 KiB, one per RTT (+ handshake, ramp)


def test_without_delay_only_bandwidth_counts() -> None:
    """Zero RTT: no handshake or rounds cost anything; the time is size over bandwidth."""
    assert delivery_time_s(16 * MIB, gbps=10.0, rtt_s=0.0) == pytest.approx(16 * MIB / 1.25e9)


def test_the_time_grows_with_size_and_rtt() -> None:
    """More bytes or a longer path never take less time."""
    sizes = [1, IW, 100_000, MIB, 16 * MIB, 256 * MIB]
    for rtt_s in (0.001, 0.020, 0.080):
        times = [delivery_time_s(s, gbps=2.5, rtt_s=rtt_s) for s in sizes]
        assert times == sorted(times)
    assert delivery_time_s(MIB, gbps=2.5, rtt_s=0.080) > delivery_time_s(MIB, gbps=2.5, rtt_s=0.020)
