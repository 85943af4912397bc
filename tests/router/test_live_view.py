"""The live view corrects each heartbeat by this router's placements: jobs it misses are added, ended ones it still counts removed."""

from __future__ import annotations

import time

from libs.engine.profiles import model_profile
from services.router.live_view import LiveView
from tests.router.conftest import PD, load

PRFAAS = "dc-prfaas"
PROFILE = model_profile("reference")


def _view() -> LiveView:
    return LiveView(PD, instance_ttl_s=60.0, pending_ttl_s=60.0, default_hardware="h20")


def _prfaas(view: LiveView) -> tuple[int, float]:
    """Queue depth and expected wait of the PrfaaS instance as the policy reads them now."""
    [inst] = view.cluster_view("reference", PROFILE).remote_prefill[PRFAAS]
    return inst.queue_depth, inst.expected_wait_s


def _ingest(view: LiveView, **fields) -> None:
    view.ingest_load(load("d0"))
    view.ingest_load(load("p-local", role="prefill"))
    view.ingest_load(load("p-remote", role="prefill", site=PRFAAS, **fields))


def test_a_placement_counts_until_a_heartbeat_shows_it():
    """Placed and acknowledged: counted on top of an older heartbeat, not on top of one stamped after the ack."""
    view = _view()
    _ingest(view, ts=time.time() - 1)
    placement = view.place("j1", "d0", "p-remote", prefill_s=7.5, remote=True)
    placement.acked("prefill")
    assert _prfaas(view) == (1, 7.5)
    _ingest(view, queue_depth=1, expected_wait_s=7.5, ts=time.time())
    assert _prfaas(view) == (1, 7.5)  # the heartbeat shows it now: counted once


def test_a_finished_remote_prefill_stops_counting_before_the_next_heartbeat():
    """A heartbeat stamped while the prefill ran still counts it after it ended: the view takes it off at once."""
    view = _view()
    placement = view.place("j1", "d0", "p-remote", prefill_s=7.5, remote=True)
    placement.acked("decode")
    placement.acked("prefill")
    _ingest(view, queue_depth=1, expected_wait_s=7.5, ts=time.time())  # stamped while it runs
    placement.prefill_done()
    assert _prfaas(view) == (0, 0.0)  # the next long prompt does not wait behind a finished prefill
    _ingest(view, queue_depth=0, expected_wait_s=0.0, ts=time.time())  # a heartbeat after the end
    assert _prfaas(view) == (0, 0.0) and view.corrections("p-remote") == 0


def test_a_closed_attempt_frees_its_decode_slot_before_the_next_heartbeat():
    """The decode slot of an ended attempt counts as free again even while the last heartbeat still holds it."""
    view = _view()
    placement = view.place("j1", "d0", "p-local", prefill_s=0.1, remote=False)
    placement.acked("decode")
    view.ingest_load(load("d0", free_decode_slots=7, ts=time.time()))
    view.ingest_load(load("p-local", role="prefill"))
    view.ingest_load(load("p-remote", role="prefill", site=PRFAAS))
    [d0] = view.cluster_view("reference", PROFILE).decode
    assert d0.free_decode_slots == 7
    placement.close()
    [d0] = view.cluster_view("reference", PROFILE).decode
    assert d0.free_decode_slots == 8
