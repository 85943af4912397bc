"""A site pair's breaker: open on link failures or a silent site, half-open after a hold, closed by a probe."""

from __future__ import annotations

import random

import pytest

from libs.common.errors import ConfigError
from libs.policy import ClusterView, PolicyConfig, RouteRequest, make_policy
from libs.policy.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, LinkBreakers
from tests.policy.test_policies import T, view

A, B = "dc-a", "dc-b"  # the PrfaaS site, the router's (decode) site
T0 = 43_384.0  # 12:03:04 UTC on the epoch's first day
CFG = BreakerConfig(failures=2, window_s=10.0, silence_s=1.5, hold_s=2.0, max_hold_s=8.0, recover_s=1.0)


def breakers(config: BreakerConfig = CFG) -> LinkBreakers:
    """Breakers for the pairs into dc-b, both sites heard at T0."""
    found = LinkBreakers(B, config)
    found.heard(A, T0)
    found.heard(B, T0)
    return found


def hear_both(br: LinkBreakers, start: float, end: float, step: float = 0.5) -> None:
    """Heartbeats from both sites every ``step`` seconds over [start, end]."""
    t = start
    while t <= end + 1e-9:
        br.heard(A, t)
        br.heard(B, t)
        t += step


def fail(br: LinkBreakers, now: float, started_at: float | None = None, probe: bool = False, why: str = "x") -> None:
    br.attempt_ended(A, now, now - 1.0 if started_at is None else started_at, probe=probe, ok=False, why=why)


def test_a_pair_never_heard_of_or_healthy_is_closed_and_admits():
    """No breaker state without evidence: closed, admitting, for a pair heard from and for one never heard of."""
    br = breakers()
    for site in (A, "dc-c"):
        state = br.state(site, T0 + 0.5)
        assert (state.state, state.admits) == (CLOSED, True)


def test_failures_within_the_window_open_the_link_and_the_note_names_it_and_since_when():
    """Two link failures 1 s apart open it at the second; the note says the pair, the UTC time and the count."""
    br = breakers()
    fail(br, T0 + 0.2, why="transfer_failed")
    assert br.state(A, T0 + 0.3).admits  # one failure is a glitch
    fail(br, T0 + 1.2, why="transfer_failed")
    state = br.state(A, T0 + 1.3)
    assert (state.state, state.admits, state.since) == (OPEN, False, T0 + 1.2)
    assert state.note() == "link dc-a->dc-b open since 12:03:05 (2 transfers failed in 1.0s: transfer_failed)"


def test_failures_further_apart_than_the_window_or_with_a_success_between_do_not_open_it():
    """Failures 10.5 s apart, or with an attempt whose KV arrived between them, leave the link closed."""
    br = breakers()
    hear_both(br, T0, T0 + 30)
    fail(br, T0 + 1.0)
    fail(br, T0 + 11.5)
    assert br.state(A, T0 + 11.6).admits
    br.attempt_ended(A, T0 + 12.0, T0 + 11.0, probe=False, ok=True)
    fail(br, T0 + 12.5)
    assert br.state(A, T0 + 12.6).state == CLOSED


def test_attempts_that_end_without_a_verdict_on_the_link_never_open_it():
    """Refusals and decode-side failures end an attempt with ok=None: any number of them leave it closed."""
    br = breakers()
    for i in range(5):
        br.attempt_ended(A, T0 + 0.1 * i, T0, probe=False, ok=None)
    assert br.state(A, T0 + 1.0).state == CLOSED


def test_a_silent_site_opens_its_link_once_others_are_heard_past_the_silence():
    """dc-a heard last at T0, dc-b every 0.5 s: open from T0 + 1.5 on, as soon as dc-b's next heartbeat shows it."""
    br = breakers()
    br.heard(B, T0 + 1.0)
    assert br.state(A, T0 + 1.4).admits
    br.heard(B, T0 + 1.5)
    assert br.state(A, T0 + 1.55).admits  # 1.5 s of silence is not yet more than 1.5 s
    br.heard(B, T0 + 2.0)
    state = br.state(A, T0 + 2.05)
    assert (state.state, state.since, state.admits) == (OPEN, T0 + 1.5, False)
    assert "nothing heard from dc-a for 2.0s" in state.note()


def test_a_router_that_heard_nobody_blames_no_site():
    """No message from any site for 10 s (the router's own loop or connection stalled): nothing opens."""
    br = breakers()
    assert br.state(A, T0 + 10.0).admits


def test_after_a_silence_the_link_is_half_open_once_heard_for_recover_s_and_one_probe_closes_it():
    """Silent 5 s, heard again: open for recover_s, then half-open; the probe is the only remote attempt; its KV closes it."""
    br = breakers()
    br.heard(B, T0 + 5.0)
    hear_both(br, T0 + 5.5, T0 + 6.0)  # dc-a back at T0 + 5.5
    assert br.state(A, T0 + 6.4).state == OPEN  # heard again for 0.9 s only
    hear_both(br, T0 + 6.5, T0 + 6.5)
    state = br.state(A, T0 + 6.5)
    assert (state.state, state.admits, state.since) == (HALF_OPEN, True, T0 + 6.5)
    assert br.attempt_started(A, T0 + 6.5) is True
    probing = br.state(A, T0 + 6.6)
    assert (probing.state, probing.admits) == (HALF_OPEN, False)
    assert "probe" in probing.note()
    assert br.attempt_started(A, T0 + 6.6) is False  # not a probe: it was decided before the probe was placed
    br.attempt_ended(A, T0 + 7.0, T0 + 6.5, probe=True, ok=True)
    assert (br.state(A, T0 + 7.0).state, br.state(A, T0 + 7.0).admits) == (CLOSED, True)


def test_a_failed_probe_opens_the_link_again_with_twice_the_hold_up_to_the_most():
    """Each failed probe doubles the hold (2, 4, 8, 8 s); a neutral end of a probe frees it for the next request."""
    br = breakers()
    hear_both(br, T0, T0 + 60)
    fail(br, T0 + 1.0)
    fail(br, T0 + 1.5)
    opened = T0 + 1.5
    for hold in (2.0, 4.0, 8.0, 8.0):
        assert br.state(A, opened + hold - 0.01).state == OPEN
        assert br.state(A, opened + hold).state == HALF_OPEN
        assert br.attempt_started(A, opened + hold)
        br.attempt_ended(A, opened + hold + 0.1, opened + hold, probe=True, ok=None)  # a refusal: no verdict
        assert br.state(A, opened + hold + 0.1).admits
        assert br.attempt_started(A, opened + hold + 0.2)
        fail(br, opened + hold + 0.5, started_at=opened + hold + 0.2, probe=True, why="transfer_failed")
        opened += hold + 0.5
        state = br.state(A, opened)
        assert (state.state, state.since) == (OPEN, opened)
        assert "probe failed: transfer_failed" in state.note()


def test_verdicts_of_attempts_placed_before_the_trip_say_nothing_after_it():
    """An attempt placed before the link opened: its failure does not lengthen the hold, its success does not close it."""
    br = breakers()
    hear_both(br, T0, T0 + 30)
    fail(br, T0 + 1.0)
    fail(br, T0 + 1.5)
    fail(br, T0 + 3.0, started_at=T0 + 0.5)  # placed before the trip at T0 + 1.5
    assert br.state(A, T0 + 3.5).state == HALF_OPEN  # the hold is still 2 s from T0 + 1.5
    br.attempt_ended(A, T0 + 3.6, T0 + 1.0, probe=False, ok=True)
    assert br.state(A, T0 + 3.6).state == HALF_OPEN
    br.attempt_ended(A, T0 + 4.0, T0 + 3.7, probe=False, ok=True)  # placed after the trip: its KV proves the link
    assert br.state(A, T0 + 4.0).state == CLOSED
    fail(br, T0 + 4.5, started_at=T0 + 3.0)  # placed before the link closed again: not counted
    fail(br, T0 + 4.6, started_at=T0 + 4.1)
    assert br.state(A, T0 + 4.7).state == CLOSED  # one failure since the close


def test_a_site_that_falls_silent_while_half_open_is_open_again():
    """Half-open, then silent for more than silence_s: open, whatever the probe."""
    br = breakers()
    hear_both(br, T0, T0 + 10)
    fail(br, T0 + 1.0)
    fail(br, T0 + 1.5)
    assert br.state(A, T0 + 4.0).state == HALF_OPEN
    br.heard(B, T0 + 12.0)
    assert br.state(A, T0 + 12.0).state == OPEN


def test_states_lists_every_pair_heard_from():
    """``states`` gives one state per PrfaaS site heard from, never the decode site itself."""
    br = breakers()
    br.heard("dc-c", T0 + 0.5)
    assert sorted(s.src_site for s in br.states(T0 + 1.0)) == [A, "dc-c"]


@pytest.mark.parametrize(
    "fields",
    [
        {"failures": 0},
        {"window_s": 0.0},
        {"silence_s": -1.0},
        {"hold_s": 0.0},
        {"max_hold_s": 1.0},
        {"recover_s": -0.1},
    ],
)
def test_bad_settings_are_refused(fields):
    """Non-positive counts and times, or a largest hold below the hold, are a ConfigError."""
    with pytest.raises(ConfigError):
        BreakerConfig(**fields)


NOTE = "link dc-prfaas->dc-pd open since 12:03:05 (2 transfers failed in 1.0s: transfer_failed)"


@pytest.mark.parametrize("policy", ["static-threshold", "adaptive", "cost-model", "remote-only"])
def test_every_policy_names_the_open_link_when_it_keeps_a_long_prompt_local(policy):
    """A view without its PrfaaS instances and with the breaker's note: local, and the reason is the note."""
    full = view()
    without = ClusterView(
        full.model,
        full.decode_site,
        tuple(i for i in full.instances if i.site == "dc-pd"),
        full.links,
        unavailable=(NOTE,),
    )
    decision = make_policy(policy, PolicyConfig(threshold_tokens=T)).decide(
        without, RouteRequest("r1", 100_000, 1024, {}), now=12.5, rng=random.Random(0)
    )
    assert decision.choice == "local" and NOTE in decision.reason, decision.reason
    assert "no PrfaaS site reachable" not in decision.reason
