"""Simulated senders publish LinkStats with kvwire's semantics, and the router view built from them lags the link."""

from __future__ import annotations

import pytest

from libs.common.errors import ConfigError
from libs.engine.profiles import HARDWARE, MODELS
from libs.planner.link import Flow, FluidLink
from libs.planner.sim_telemetry import LinkSampler, MeteredLink, TelemetrySettings
from libs.planner.simulator import PD_SITE, PRFAAS_SITE, SimSpec, Simulator
from libs.planner.workloads import Empirical
from libs.policy import LinkTelemetry, PolicyConfig

WINDOW = 64 << 20
BASE_RTT = 0.005


def run_until(link: FluidLink, t: float) -> None:
    """Advance ``link`` event by event (rates change only at events) up to ``t``."""
    while link.next_event_s() <= t:
        link.advance(link.next_event_s())
    link.advance(t)


def sampler(link: MeteredLink, ack_delay_s: float = 0.0) -> LinkSampler:
    """A sampler of ``link`` for the PrfaaS -> PD pair."""
    return LinkSampler(link, PRFAAS_SITE, PD_SITE, BASE_RTT, WINDOW, ack_delay_s)


def test_a_production_limited_transfer_on_an_ample_link():
    """One layer-wise flow: goodput is what it produced, busy goodput its rate, utilisation against the budget."""
    link = MeteredLink(100.0, 100.0)
    link.add(Flow("a", 1e9, 0.0, 2.0, owner="p0"), 0.0)  # 4 Gbps of production
    link.advance(1.0)
    s = sampler(link).sample("p0", 1.0)
    assert s.goodput_gbps == pytest.approx(4.0)
    assert s.busy_goodput_gbps == pytest.approx(4.0)
    assert s.utilization == pytest.approx(0.04)
    assert s.rtt_s == pytest.approx(BASE_RTT)  # nothing queues
    assert s.active_transfers == 1 and s.bytes_in_flight == pytest.approx(0.5e9 * BASE_RTT)  # rate x RTT
    assert (s.src_site, s.dst_site, s.sender) == (PRFAAS_SITE, PD_SITE, "p0")


def test_late_acks_raise_the_smoothed_rtt_not_the_least():
    """A loaded host acks 60 ms late: the smoothed RTT carries the delay, the interval's least RTT stays the path's."""
    link = MeteredLink(100.0, 100.0)
    link.add(Flow("a", 1e9, 0.0, 2.0, owner="p0"), 0.0)
    link.advance(1.0)
    s = sampler(link, ack_delay_s=0.06).sample("p0", 1.0)
    assert s.rtt_s == pytest.approx(BASE_RTT + 0.06) and s.min_rtt_s == pytest.approx(BASE_RTT)
    assert s.limited_s == 0.0  # it kept up with its prefill: nothing waited on the link


def test_a_backlogged_sender_beside_others_on_a_link_at_its_budget_is_not_limited():
    """At the budget the pacer, not the link, sets the pace: a sender's backlog there is not KV waiting on the link."""
    link = MeteredLink(10.0, 10.0)
    link.add(Flow("a", 5e9, 0.0, 0.01, owner="p0"), 0.0)  # all at once: waits for its share
    link.add(Flow("b", 0.5e9, 0.0, 1.0, owner="p1"), 0.0)  # 4 Gbps of prefill
    run_until(link, 1.0)
    a = sampler(link).sample("p0", 1.0)
    assert a.busy_goodput_gbps == pytest.approx(6.0) and a.limited_s == 0.0


def test_busy_goodput_covers_only_the_time_a_transfer_was_active():
    """A sender active half of the interval shows half the goodput but its full busy goodput."""
    link = MeteredLink(100.0, 100.0)
    link.add(Flow("a", 0.5e9, 0.0, 0.001, owner="p0"), 0.0)  # everything produced at once: 0.5 GB at 100 Gbps
    run_until(link, 1.0)
    s = sampler(link).sample("p0", 1.0)
    assert s.goodput_gbps == pytest.approx(4.0)
    assert s.busy_goodput_gbps == pytest.approx(100.0, rel=0.01)
    assert s.active_transfers == 0 and s.transfers_completed_total == 1


def test_a_link_below_its_budget_fills_the_windows_and_shows_queueing():
    """Capacity under the pacing budget: windows full, RTT = in flight / rate, busy goodput = the link's rate."""
    link = MeteredLink(10.0, 100.0)
    link.add(Flow("warm", 0.1e9, 0.0, 1.0, owner="p0"), 0.0)  # 0.8 Gbps: nothing queues yet
    run_until(link, 0.5)
    sample = sampler(link)
    calm = sample.sample("p0", 0.5)
    for i in range(4):
        link.add(Flow(i, 2e9, 0.5, 1.0, owner="p0"), 0.5)  # 128 Gbps offered on a 10 Gbps link
    run_until(link, 1.5)
    s = sample.sample("p0", 1.5)
    assert s.goodput_gbps == pytest.approx(10.0)
    assert s.busy_goodput_gbps == pytest.approx(10.0)
    assert s.utilization == pytest.approx(0.1)  # a paced sender's utilisation says nothing of the degradation
    assert s.bytes_in_flight == 4 * WINDOW  # the rest of the backlog waits in the sender, unseen
    assert s.rtt_s == pytest.approx(4 * WINDOW / (10e9 / 8))
    assert calm.limited_s == 0.0  # the warm-up flow kept up with its prefill: nothing waited
    assert s.limited_s == pytest.approx(1.0) and s.limited_goodput_gbps == pytest.approx(10.0)
    tel = LinkTelemetry()
    tel.ingest(calm, 0.5)
    tel.ingest(s, 1.5)
    view = tel.view(PRFAAS_SITE, PD_SITE, 1.5)
    assert view.capacity_gbps == 100.0 and view.deliverable_gbps == pytest.approx(10.0)


def test_a_transfer_waiting_for_its_turn_is_active_with_nothing_in_flight():
    """Sender-fifo on a congested link: both transfers are active, only the one sending has a window in flight."""
    link = MeteredLink(10.0, 100.0, sharing="sender-fifo")
    for key in "ab":
        link.add(Flow(key, 2e9, 0.0, 0.5, owner="p0"), 0.0)
    run_until(link, 1.0)
    s = sampler(link).sample("p0", 1.0)
    assert s.active_transfers == 2
    assert s.bytes_in_flight == WINDOW
    assert s.rtt_s == pytest.approx(WINDOW / (10e9 / 8))


def test_each_sender_reports_only_its_own_transfers():
    """Two senders on one link: each sample counts its own flows and bytes."""
    link = MeteredLink(100.0, 100.0)
    link.add(Flow("a", 1e9, 0.0, 2.0, owner="p0"), 0.0)
    link.add(Flow("b", 2e9, 0.0, 2.0, owner="p1"), 0.0)
    link.advance(1.0)
    sample = sampler(link)
    a, b = sample.sample("p0", 1.0), sample.sample("p1", 1.0)
    assert (a.goodput_gbps, b.goodput_gbps) == (pytest.approx(4.0), pytest.approx(8.0))
    assert sample.sample("p9", 1.0).active_transfers == 0


def test_the_router_sees_a_capacity_drop_only_through_telemetry_after_the_lag():
    """In the simulator the policy's link view changes only through LinkStats: not before they arrive, then to the new rate."""
    settings = TelemetrySettings(interval_s=1.0, lag_s=0.5)
    spec = SimSpec(
        MODELS["kimi-linear-1t"],
        HARDWARE["h200"],
        4,
        HARDWARE["h20"],
        3,
        5,
        100.0,
        Empirical(lengths=[60_000]),
        256,
        rate_rps=3.0,
        duration_s=40.0,
        policy_config=PolicyConfig(threshold_tokens=19_400),
        link_schedule=((20.0, 5.0),),
        telemetry=settings,
    )
    sim = Simulator(spec)
    seen: list[tuple[float, float]] = []
    view = sim._view

    def recording(now):
        v = view(now)
        seen.append((now, v.links[0].effective_gbps))
        return v

    sim._view = recording
    sim.run()
    before = [gbps for t, gbps in seen if t < 20.5]
    after = [gbps for t, gbps in seen if t > 34.0]  # lag, then the 10 s window of congested samples
    assert before and all(gbps == 100.0 for gbps in before)  # nothing can show the drop before a sample lands
    assert after and all(gbps == pytest.approx(5.0, rel=0.05) for gbps in after)


def _lab_run(link_schedule: tuple[tuple[float, float], ...] = (), ack_delay_s: float = 0.0) -> tuple[Simulator, list]:
    """The default lab in the simulator: sparse 12K-token prompts, adaptive t=1,212, 10 Gbps / 20 ms; (sim, views read)."""
    settings = TelemetrySettings(ack_delay_s=ack_delay_s)
    spec = SimSpec(
        MODELS["reference"],
        HARDWARE["cpu"],
        1,
        HARDWARE["cpu"],
        1,
        1,
        10.0,
        Empirical(lengths=[12_200]),
        8,
        rate_rps=0.1,
        duration_s=120.0,
        policy_config=PolicyConfig(threshold_tokens=1_212),
        policy="adaptive",
        link_rtt_s=0.02,
        link_schedule=link_schedule,
        telemetry=settings,
        seed=3,
    )
    sim = Simulator(spec)
    seen: list[tuple[float, float]] = []
    view = sim._view

    def recording(now):
        v = view(now)
        seen.append((now, v.links[0].effective_gbps))
        return v

    sim._view = recording
    return sim, seen


def test_sparse_prefill_paced_transfers_with_late_acks_keep_the_budget():
    """12K-token transfers paced by their prefill, every ack 60 ms late (a loaded host): the link reads 10 Gbps throughout."""
    sim, seen = _lab_run(ack_delay_s=0.06)
    run = sim.run()
    assert len(run.requests) >= 6 and run.decisions == {"remote": len(run.requests)}
    assert seen and all(gbps == 10.0 for _, gbps in seen)


def test_a_link_slowed_below_the_prefills_kv_rate_is_read_as_degraded():
    """The control: at 20 Mbps (the lab test's slow link) the KV waits on the link and the view follows it down."""
    sim, seen = _lab_run(link_schedule=((30.0, 0.02),), ack_delay_s=0.06)
    sim.run()
    assert all(gbps == 10.0 for t, gbps in seen if t < 30.0)
    after = [gbps for t, gbps in seen if t > 60.0]
    assert after and all(gbps == pytest.approx(0.02, rel=0.05) for gbps in after)


def test_settings_are_validated_and_reported():
    """Telemetry settings name the bad key; the scenario JSON carries them."""
    with pytest.raises(ConfigError, match="lag_s"):
        TelemetrySettings(lag_s=-1.0)
    with pytest.raises(ConfigError, match="ack_delay_s"):
        TelemetrySettings(ack_delay_s=-0.1)
    doc = TelemetrySettings().to_json()
    assert doc["interval_s"] == 1.0 and doc["router"]["smoothing_s"] == 5.0
