"""LinkTelemetry: the link as a router knows it, from the LinkStats senders publish."""

from __future__ import annotations

import math

import pytest

from libs.common.errors import ConfigError
from libs.common.messages import LinkStats, encode, link_stats_decoder
from libs.policy import LinkTelemetry, TelemetryConfig

SRC, DST = "dc-prfaas", "dc-pd"
BASE_RTT = 0.005


def stats(
    *,
    goodput: float = 0.0,
    busy: float | None = None,
    budget: float = 100.0,
    rtt: float = BASE_RTT,
    min_rtt: float | None = None,
    in_flight: int = 0,
    active: int = 0,
    acked_total: int = 0,
    completed_total: int = 0,
    sender: str = "",
    interval: float = 1.0,
    limited: float = 0.0,
    limited_gbps: float | None = None,
) -> LinkStats:
    """One LinkStats sample with kvwire's semantics (goodput, busy goodput, ``limited`` seconds of KV waiting)."""
    busy = goodput if busy is None else busy
    return LinkStats(
        src_site=SRC,
        dst_site=DST,
        ts=0.0,
        interval_s=interval,
        budget_gbps=budget,
        goodput_gbps=goodput,
        busy_goodput_gbps=busy,
        utilization=goodput / budget if budget else 0.0,
        rtt_s=rtt,
        min_rtt_s=rtt if min_rtt is None else min_rtt,
        bytes_in_flight=in_flight,
        active_transfers=active,
        acked_bytes_total=acked_total,
        retransmitted_bytes_total=0,
        retransmitted_chunks_total=0,
        transfers_completed_total=completed_total,
        transfers_failed_total=0,
        sender=sender,
        limited_s=limited,
        limited_goodput_gbps=(busy if limited_gbps is None else limited_gbps) if limited else 0.0,
    )


def test_senders_of_one_pair_are_combined():
    """Goodput, bytes in flight and transfers add up over senders; the budget is the pair's, not their sum."""
    tel = LinkTelemetry(TelemetryConfig(smoothing_s=1e-3))  # no smoothing: the sums show as they are
    tel.ingest(stats(goodput=3.0, busy=6.0, in_flight=1 << 20, active=1, sender="p0"), 10.0)
    tel.ingest(stats(goodput=5.0, busy=5.0, in_flight=3 << 20, active=2, sender="p1"), 10.5)
    tel.ingest(stats(goodput=3.0, busy=6.0, in_flight=1 << 20, active=1, sender="p0"), 11.0)  # replaces p0's first
    view = tel.view(SRC, DST, 11.0)
    assert view.goodput_gbps == pytest.approx(8.0)
    assert (view.bytes_in_flight, view.active_transfers) == (4 << 20, 3)
    assert view.capacity_gbps == 100.0
    assert view.deliverable_gbps is None  # nothing queues: the link may carry far more than it does
    assert view.utilization == pytest.approx(0.08)


def test_sender_defaults_to_the_message_field():
    """Without an explicit sender, samples are keyed by ``LinkStats.sender``: two processes both count."""
    tel = LinkTelemetry()
    for sender in ("p0", "p1"):
        tel.ingest(link_stats_decoder.decode(encode(stats(goodput=2.0, active=1, sender=sender))), 1.0)
    assert tel.view(SRC, DST, 1.0).active_transfers == 2


def test_an_idle_or_lightly_used_link_keeps_its_capacity():
    """Low goodput without queueing says nothing about capacity: the budget stands."""
    tel = LinkTelemetry()
    for t in range(10):
        tel.ingest(stats(goodput=0.5, busy=3.0, active=1), float(t))
    view = tel.view(SRC, DST, 9.0)
    assert view.deliverable_gbps is None and view.effective_gbps == 100.0
    assert view.queue_delay_s == 0.0


def test_a_degraded_link_makes_kv_wait_and_the_rate_meanwhile_becomes_the_estimate():
    """Windows full the whole interval (KV waits on the link): what it delivered meanwhile is what it delivers now."""
    tel = LinkTelemetry()
    tel.ingest(stats(goodput=4.0, busy=4.0, active=1), 0.0)  # base RTT learnt
    for t in range(1, 8):
        tel.ingest(
            stats(goodput=10.0, busy=10.0, rtt=0.3, min_rtt=0.2, in_flight=5 * (64 << 20), active=5, limited=1.0),
            float(t),
        )
    view = tel.view(SRC, DST, 7.0)
    assert view.deliverable_gbps == pytest.approx(10.0)
    assert view.effective_gbps == pytest.approx(10.0)
    assert view.queue_delay_s == pytest.approx(0.3 - BASE_RTT)
    assert view.utilization > 0.7  # measured against what the link delivers, not against the 100 Gbps budget
    assert view.backlog_s == pytest.approx(0.295)


def test_a_partly_limited_interval_does_not_drag_the_estimate_down():
    """Only the limited part of an interval counts; a lasting drop shows once it holds most of the recent limited time."""
    tel = LinkTelemetry(TelemetryConfig(bottleneck_window_s=10.0))
    tel.ingest(stats(goodput=1.0, active=1), 0.0)
    for t, (gbps, limited) in enumerate(((10.0, 1.0), (10.0, 1.0), (4.0, 0.4)), start=1):  # the backlog ended at 0.4 s
        tel.ingest(stats(goodput=gbps, busy=gbps, rtt=0.2, active=4, limited=limited, limited_gbps=10.0), float(t))
    assert tel.view(SRC, DST, 3.0).deliverable_gbps == pytest.approx(10.0)
    for t in range(4, 7):
        tel.ingest(stats(goodput=5.0, busy=5.0, rtt=0.2, active=4, limited=1.0), float(t))
        held = tel.view(SRC, DST, float(t)).deliverable_gbps
        assert held == pytest.approx(10.0 if t < 6 else 5.0)  # 2.4 s at 10 Gbps, then 3 of 5.4 s at 5


def test_a_few_bunched_acks_do_not_lift_the_estimate():
    """A millisecond of acks bunched at 3 Gbps beside 1.3 s at 20 Mbps: the link delivers 20 Mbps."""
    tel = LinkTelemetry()
    tel.ingest(stats(goodput=0.02, active=1, limited=0.001, limited_gbps=3.0), 0.0)
    for t in (1.0, 2.0):
        tel.ingest(stats(goodput=0.013, active=1, rtt=0.4, limited=0.65, limited_gbps=0.02), t)
    assert tel.view(SRC, DST, 2.0).deliverable_gbps == pytest.approx(0.02)


def test_late_acks_without_kv_waiting_are_not_a_degraded_link():
    """RTT far above its base on a sparsely used link (a busy CPU acking late): no estimate, no queueing delay."""
    tel = LinkTelemetry()
    tel.ingest(stats(goodput=0.1, active=1), 0.0)  # base RTT learnt
    for t in range(1, 20):
        tel.ingest(stats(goodput=0.05, busy=0.1, rtt=0.25, min_rtt=BASE_RTT, active=1), float(t))
    view = tel.view(SRC, DST, 19.0)
    assert view.deliverable_gbps is None and view.effective_gbps == 100.0
    assert view.queue_delay_s == 0.0 and view.rtt_s == pytest.approx(0.25)


def test_once_the_link_reads_slow_its_rtt_above_base_is_queueing():
    """After KV waited on a slow link, a sample without limited time (a transfer starting) still shows its queueing."""
    tel = LinkTelemetry()
    tel.ingest(stats(goodput=0.01, active=1), 0.0)
    tel.ingest(stats(goodput=0.013, active=1, rtt=0.4, limited=0.65, limited_gbps=0.02), 1.0)
    tel.ingest(stats(goodput=0.009, active=1, rtt=0.3), 2.0)
    view = tel.view(SRC, DST, 2.0)
    assert view.deliverable_gbps == pytest.approx(0.02) and view.queue_delay_s == pytest.approx(0.3 - BASE_RTT)


def test_limited_time_must_add_up_before_it_reads_as_deliverable():
    """A stalled process spreads a few acks briefly: below min_limited_s in the window nothing changes; more does."""
    tel = LinkTelemetry(TelemetryConfig(min_limited_s=0.25, bottleneck_window_s=10.0))
    tel.ingest(stats(goodput=0.1, active=1), 0.0)
    for t in (1.0, 5.0):
        tel.ingest(stats(goodput=0.05, active=1, rtt=0.1, limited=0.1, limited_gbps=0.5), t)
    assert tel.view(SRC, DST, 5.0).deliverable_gbps is None  # 0.2 s in the window
    tel.ingest(stats(goodput=0.2, active=1, rtt=0.1, limited=0.1, limited_gbps=2.0), 9.0)
    assert tel.view(SRC, DST, 9.0).deliverable_gbps == pytest.approx(0.5)  # 0.3 s, 0.2 of them at 0.5 Gbps
    tel.ingest(stats(goodput=0.2, active=1, rtt=0.1, limited=0.1, limited_gbps=2.0), 21.0)
    assert tel.view(SRC, DST, 21.0).deliverable_gbps is None  # the earlier ones left the window: 0.1 s again


def test_senders_limited_together_add_up():
    """Two processes backlogged on one link each get half of it: their limited rates add up to the link's."""
    tel = LinkTelemetry()
    tel.ingest(stats(goodput=1.0, active=1, sender="p0"), 0.0)
    for t in range(1, 4):
        for sender in ("p0", "p1"):
            tel.ingest(stats(goodput=3.0, active=2, rtt=0.2, limited=1.0, sender=sender), float(t))
    assert tel.view(SRC, DST, 3.0).deliverable_gbps == pytest.approx(6.0)


def test_estimate_is_held_then_probes_back_to_capacity():
    """After the last limited sample the estimate holds for hold_s, then grows by probe_per_s until the budget."""
    cfg = TelemetryConfig(hold_s=30.0, probe_per_s=0.05)
    tel = LinkTelemetry(cfg)
    tel.ingest(stats(goodput=1.0, active=1), 0.0)
    tel.ingest(stats(goodput=10.0, busy=10.0, rtt=0.2, active=4, limited=1.0), 1.0)
    for t in range(2, 100):
        tel.ingest(stats(goodput=2.0, busy=2.0, active=1), float(t))
        if t == 30:
            assert tel.view(SRC, DST, t).deliverable_gbps == pytest.approx(10.0)  # held
        if t == 51:
            assert tel.view(SRC, DST, t).deliverable_gbps == pytest.approx(10.0 * math.exp(0.05 * 20))  # probing
    assert tel.view(SRC, DST, 99.0).deliverable_gbps is None  # 10 * e^(0.05 * 68) > 100: back to the budget


def test_a_recovered_link_proves_itself_by_what_it_carries():
    """Once the link recovers, the backlog leaves at the budget (not limited): that goodput lifts the estimate and
    stays, and probing starts from it."""
    tel = LinkTelemetry(TelemetryConfig(hold_s=30.0, probe_per_s=0.05))
    tel.ingest(stats(goodput=1.0, active=1), 0.0)
    for t in (1.0, 2.0, 3.0):
        tel.ingest(stats(goodput=10.0, active=4, rtt=0.2, limited=1.0), t)
    tel.ingest(stats(goodput=60.0, active=2), 4.0)
    assert tel.view(SRC, DST, 4.0).deliverable_gbps == pytest.approx(60.0)
    tel.ingest(stats(goodput=5.0, active=1), 5.0)  # little traffic since: the proof stands
    assert tel.view(SRC, DST, 5.0).deliverable_gbps == pytest.approx(60.0)
    assert tel.view(SRC, DST, 38.0).deliverable_gbps == pytest.approx(60.0 * math.exp(0.05 * 5))


def test_goodput_is_smoothed_over_the_configured_time_constant():
    """A step in goodput reaches 1 - 1/e of the new value after one time constant of samples."""
    tel = LinkTelemetry(TelemetryConfig(smoothing_s=5.0))
    tel.ingest(stats(goodput=0.0, active=1), 0.0)
    for t in range(1, 6):
        tel.ingest(stats(goodput=10.0, active=1), float(t))
    assert tel.view(SRC, DST, 5.0).goodput_gbps == pytest.approx(10.0 * (1 - math.exp(-1.0)))


def test_silent_senders_stop_counting():
    """A sender silent past stale_after_s drops out; with none left the view has no load figures."""
    tel = LinkTelemetry(TelemetryConfig(stale_after_s=3.0))
    tel.ingest(stats(goodput=5.0, active=2, in_flight=1 << 20, sender="p0"), 0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        tel.ingest(stats(goodput=1.0, active=1, sender="p1"), t)
    assert tel.view(SRC, DST, 4.0).active_transfers == 1  # p0 last heard at 0 s
    view = tel.view(SRC, DST, 10.0)
    assert (view.active_transfers, view.bytes_in_flight, view.utilization) == (0, 0, 0.0)
    assert view.age_s == pytest.approx(6.0)
    assert view.capacity_gbps == 100.0


def test_mean_transfer_size_counts_every_acknowledged_byte():
    """Bytes acknowledged in intervals without a completion still belong to the transfers that complete."""
    tel = LinkTelemetry()
    acked = 0
    for t in range(12):
        acked += 250_000_000
        tel.ingest(stats(goodput=2.0, active=1, acked_total=acked, completed_total=(t + 1) // 4), float(t))
    assert tel.view(SRC, DST, 11.0).mean_transfer_bytes == pytest.approx(1e9, rel=0.01)


def test_pairs_without_telemetry():
    """An unknown pair is None unless its capacity is configured; then it is 'as provisioned, never heard'."""
    assert LinkTelemetry().view(SRC, DST, 0.0) is None
    view = LinkTelemetry(capacity_gbps={(SRC, DST): 40.0}).view(SRC, DST, 0.0)
    assert view.capacity_gbps == 40.0 and view.age_s == math.inf
    unpaced = LinkTelemetry(default_capacity_gbps=25.0)
    unpaced.ingest(stats(goodput=3.0, budget=0.0, active=1), 0.0)
    assert unpaced.view(SRC, DST, 0.0).capacity_gbps == 25.0  # unpaced: the provisioned figure


def test_config_errors_name_the_key():
    """Every telemetry setting must be a positive number; the error names it."""
    with pytest.raises(ConfigError, match="hold_s"):
        TelemetryConfig(hold_s=0)
    with pytest.raises(ConfigError, match="smoothing_s"):
        TelemetryConfig(smoothing_s=math.nan)
    with pytest.raises(ConfigError, match="transfer_size_gain"):
        TelemetryConfig(transfer_size_gain=2.0)
