"""``prfaas bench bridge``: every path of the engine bridge timed, with its baseline from the same run."""

from __future__ import annotations

import json

from libs.cli import main


def test_bridge_benchmark_prints_each_path_against_its_baseline(capsys) -> None:
    """The JSON has the normal, repaired and reset paths, idle lookups, live vs replayed batches, and ratios."""
    assert main(["bench", "bridge", "--json", "--rounds", "1", "--buffered", "50"]) == 0
    figures = json.loads(capsys.readouterr().out)
    for key in ("normal", "repaired", "reset", "lookups_idle", "live", "first_contact_replay", "lookups_during_replay"):
        assert 0 < figures[key]["min_ms"] <= figures[key]["median_ms"] <= figures[key]["max_ms"], key
    assert figures["repaired"]["vs_baseline"] > 0 and figures["first_contact_replay"]["vs_baseline"] > 0
    assert (figures["rounds"], figures["buffered"]) == (1, 50)
