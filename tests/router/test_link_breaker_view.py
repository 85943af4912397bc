"""The live view's link breakers: remote attempts' verdicts and the sites' silence decide whether PrfaaS sites are in the view."""

from __future__ import annotations

import asyncio
import time

from libs.common.messages import LinkStats
from libs.engine.profiles import model_profile
from libs.policy.breaker import BreakerConfig
from services.router.live_view import LiveView
from tests.router.conftest import PD, load

PRFAAS = "dc-prfaas"
PROFILE = model_profile("reference")
FAST = BreakerConfig(failures=2, window_s=10.0, silence_s=0.3, hold_s=0.2, max_hold_s=1.0, recover_s=0.1)


def _view(config: BreakerConfig = FAST) -> LiveView:
    view = LiveView(PD, instance_ttl_s=60.0, pending_ttl_s=60.0, default_hardware="h20", breaker=config)
    _hear(view)
    return view


def _hear(view: LiveView, remote: bool = True) -> None:
    """Heartbeats of the local instances, and of the PrfaaS one unless ``remote`` is False."""
    view.ingest_load(load("d0"))
    view.ingest_load(load("p-local", role="prefill"))
    if remote:
        view.ingest_load(load("p-remote", role="prefill", site=PRFAAS))


def _remote_in_view(view: LiveView) -> bool:
    return PRFAAS in view.cluster_view("reference", PROFILE).remote_prefill


def _attempt(view: LiveView, job: str, ok: bool | None, why: str = "transfer_failed: lease ran out") -> None:
    placement = view.place(job, "d0", "p-remote", prefill_s=0.1, remote=True)
    placement.link_verdict(ok, why)
    placement.close()


def test_two_transfers_failed_on_the_link_leave_the_prfaas_site_out_with_a_note():
    """After two remote attempts the link failed, the view has no PrfaaS prefill and says which link is open since when."""
    view = _view()
    _attempt(view, "j1", False)
    assert _remote_in_view(view)
    _attempt(view, "j2", False)
    cluster = view.cluster_view("reference", PROFILE)
    assert PRFAAS not in cluster.remote_prefill and [i.name for i in cluster.local_prefill] == ["p-local"]
    [note] = cluster.unavailable
    assert note.startswith(f"link {PRFAAS}->{PD} open since ") and "2 transfers failed in" in note
    assert "transfer_failed: lease ran out" in note


def test_attempts_ending_without_a_link_verdict_keep_the_site_in_the_view():
    """Refused, decode-side failures, local attempts: closing without a verdict never opens the link."""
    view = _view()
    for i in range(4):
        view.place(f"r{i}", "d0", "p-remote", prefill_s=0.1, remote=True).close()
        local = view.place(f"l{i}", "d0", "p-local", prefill_s=0.1, remote=False)
        local.link_verdict(False, "not a link")  # a local attempt has no link to blame
        local.close()
    assert _remote_in_view(view)
    assert view.link_states()[0].state == "closed"


async def test_a_silent_prfaas_site_leaves_the_view_within_bounds_while_the_local_one_is_heard():
    """The PrfaaS site stops heartbeating, the local one goes on every 50 ms: out of the view after 0.3 s of silence.

    Lower bound: the breaker's own silence (0.3 s). Upper: that, one local heartbeat (50 ms) and this loop's
    poll (10 ms), plus 0.6 s for a loaded 2-core machine delaying the test's own loop.
    """
    view = _view()
    last_remote = time.time()
    while _remote_in_view(view):
        assert time.time() - last_remote < 0.3 + 0.05 + 0.01 + 0.6, "the silent site stayed in the view"
        _hear(view, remote=False)
        await asyncio.sleep(0.01 if time.time() - last_remote > 0.25 else 0.05)
    gone_s = time.time() - last_remote
    assert gone_s > 0.3
    [note] = view.cluster_view("reference", PROFILE).unavailable
    assert f"nothing heard from {PRFAAS}" in note


async def test_after_the_hold_one_probe_goes_remote_and_its_kv_closes_the_link():
    """Open, then half-open once heard again: one placement is the probe (the view leaves the site out meanwhile); its success closes it."""
    view = _view()
    _attempt(view, "j1", False)
    _attempt(view, "j2", False)
    opened = time.time()
    while not _remote_in_view(view):  # hold 0.2 s; the site heard all along (recover 0.1 s)
        assert time.time() - opened < 0.2 + 1.0, "not half-open within the hold and a loaded machine's second"
        _hear(view)
        await asyncio.sleep(0.02)
    assert time.time() - opened >= 0.2
    assert view.link_states()[0].state == "half-open"
    probe = view.place("probe", "d0", "p-remote", prefill_s=0.1, remote=True)
    assert not _remote_in_view(view)  # one probe at a time
    assert "probe request is in flight" in view.cluster_view("reference", PROFILE).unavailable[0]
    probe.link_verdict(True)
    probe.close()
    assert _remote_in_view(view) and view.link_states()[0].state == "closed"


def test_a_probe_that_ends_without_a_verdict_lets_the_next_request_probe():
    """Half-open with the hold over: a probe refused (closed without a verdict) frees the link for the next one."""
    view = _view(BreakerConfig(failures=1, hold_s=1e-6, max_hold_s=1e-6, recover_s=0.0))
    _attempt(view, "j1", False)
    _hear(view)
    probe = view.place("probe", "d0", "p-remote", prefill_s=0.1, remote=True)
    assert not _remote_in_view(view)
    probe.close()
    assert _remote_in_view(view)


async def test_linkstats_of_the_pair_count_as_hearing_its_site():
    """No heartbeat from the PrfaaS site past the silence, but its pair's LinkStats go on: the site stays in the view.

    LinkStats of another pair (dc-prfaas -> dc-other) say nothing about this router's link: they do not count.
    """
    view = _view()
    started = time.time()
    while time.time() - started < 2 * FAST.silence_s:  # twice the silence, observed on the wall clock
        _hear(view, remote=False)
        view.ingest_link(_stats(PRFAAS, PD), "s1")
        view.ingest_link(_stats(PRFAAS, "dc-other"), "s1")
        assert _remote_in_view(view)
        await asyncio.sleep(0.05)
    while _remote_in_view(view):  # the other pair's stats alone: out once the silence has passed
        assert time.time() - started < 2 * FAST.silence_s + 1.0, "the site stayed in the view on another pair's stats"
        _hear(view, remote=False)
        view.ingest_link(_stats(PRFAAS, "dc-other"), "s1")
        await asyncio.sleep(0.05)


def _stats(src: str, dst: str) -> LinkStats:
    return LinkStats(src, dst, time.time(), 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0, 0, 0, 0, 0)
