"""A relayed connection's congestion window: 10 segments, growth by what is acknowledged, restart after an idle RTO."""

from __future__ import annotations

from libs.lab.wan_cwnd import INITIAL_WINDOW_BYTES, CongestionWindow, rto_s

IW = 10 * 1448


def test_the_window_starts_at_ten_segments_and_doubles_per_round() -> None:
    """Sent bytes fill the window; each acknowledged byte, once due, frees its place and adds one (slow start)."""
    w = CongestionWindow(window_bytes=32 * 1024 * 1024)
    assert INITIAL_WINDOW_BYTES == IW and w.room() == IW
    w.sent(IW, now=0.0)
    assert w.room() == 0 and w.in_flight == IW
    w.acknowledge(IW, at=0.020)
    w.collect(now=0.019)
    assert w.room() == 0  # not yet due
    w.collect(now=0.020)
    assert (w.room(), w.cwnd_bytes, w.in_flight) == (2 * IW, 2 * IW, 0)


def test_acknowledgements_collected_together_all_grow_a_window_limited_sender() -> None:
    """A round sent as eight chunks whose acknowledgements are taken in one go still doubles the window."""
    w = CongestionWindow(window_bytes=32 * 1024 * 1024)
    for i in range(8):
        w.sent(IW // 8, now=i * 1e-4)
        w.acknowledge(IW // 8, at=0.020 + i * 1e-4)
    w.collect(now=0.021)
    assert (w.cwnd_bytes, w.in_flight) == (2 * IW, 0)


def test_a_rounds_acknowledgements_taken_in_two_batches_with_a_send_between_still_double_the_window() -> None:
    """Linux's rule: the window limits the sender while it is under twice the largest in flight of the current window."""
    w = CongestionWindow(window_bytes=32 * 1024 * 1024)
    for i in range(8):
        w.sent(IW // 8, now=i * 1e-4)
        w.acknowledge(IW // 8, at=0.020 + i * 1e-4)
    w.collect(now=0.0206)  # seven are due
    w.sent(w.cwnd_bytes // 8, now=0.0206)  # the reader sends one chunk before it looks again
    w.collect(now=0.021)
    assert w.cwnd_bytes == 2 * IW


def test_the_window_grows_only_while_it_limits_the_sender_and_never_past_the_receive_window() -> None:
    """A keepalive's byte, acknowledged, leaves the window as it was; growth stops at the receive window."""
    w = CongestionWindow(window_bytes=3 * IW)
    w.sent(1, now=0.0)
    w.acknowledge(1, at=0.02)
    w.collect(now=0.02)
    assert w.cwnd_bytes == IW
    for rnd in range(3):
        room = w.room()
        w.sent(room, now=rnd)
        w.acknowledge(room, at=rnd + 0.5)
        w.collect(now=rnd + 0.5)
    assert w.cwnd_bytes == 3 * IW


def test_idle_longer_than_the_rto_with_nothing_in_flight_restarts_from_ten_segments() -> None:
    """Idle past the RTO restarts the window; shorter idle, or bytes still unacknowledged, keep it."""
    assert rto_s(0.020) == 0.220 and rto_s(0.080) == 0.280  # Linux with a steady RTT: srtt + 200 ms
    w = CongestionWindow(window_bytes=32 * 1024 * 1024)
    w.cwnd_bytes = 100 * IW
    w.sent(IW, now=1.0)
    assert not w.restart_if_idle(now=2.0, rto_s=0.22)  # still in flight
    w.acknowledge(IW, at=1.02)
    w.collect(now=1.1)
    assert not w.restart_if_idle(now=1.2, rto_s=0.22) and w.cwnd_bytes == 100 * IW
    assert w.restart_if_idle(now=1.3, rto_s=0.22) and w.cwnd_bytes == IW


def test_the_next_acknowledgement_is_known_or_waited_for() -> None:
    """The reader learns when the next acknowledgement is due, or None when none was posted within the timeout."""
    w = CongestionWindow(window_bytes=32 * 1024 * 1024)
    assert w.next_ack_at(timeout_s=0.001) is None
    w.sent(IW, now=0.0)
    w.acknowledge(IW, at=5.0)
    assert w.next_ack_at(timeout_s=0.001) == 5.0
