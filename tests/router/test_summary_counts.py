"""`decisions summary` counts a request by where its prefill ran, not by its first decision."""

from __future__ import annotations

import msgspec

from libs.cli.decisions import summarize
from libs.common.messages import OutcomeEvent
from tests.router.test_decisions_cli import _decision, _outcome


def _ran(rid: str, route: str, prefill_site: str, bytes_moved: int) -> OutcomeEvent:
    """An ok outcome whose prefill ran at ``prefill_site``."""
    return msgspec.structs.replace(_outcome(rid, route, 0.2, bytes_moved), prefill_site=prefill_site)


def test_a_remote_decision_that_fell_back_to_local_is_not_offloaded():
    """Decided remote, prefilled locally after a failure: local, counted as a fallback, no link bytes."""
    events = [
        _decision("gone-local", "remote"),
        _decision("gone-local", "fallback", attempt=1),
        _ran("gone-local", "fallback", "dc-pd", 2_000),  # its KV crossed no site: the loopback bytes do not count
        _decision("stayed-remote", "remote"),
        _decision("stayed-remote", "fallback", attempt=1),
        _ran("stayed-remote", "fallback", "dc-prfaas", 5_000),  # another decode instance, still prefilled remotely
        _decision("local", "local"),
        _ran("local", "local", "dc-pd", 1_000),
    ]
    summary = summarize(events)
    assert summary["requests"] == 3 and summary["fallbacks"] == 2
    assert summary["offload_share"] == 1 / 3 and summary["decided_remote_share"] == 2 / 3
    assert summary["fell_back_to_local"] == 1 and summary["link_bytes"] == 5_000
