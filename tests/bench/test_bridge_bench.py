"""``prfaas bench bridge``: every path of the engine bridge timed against its baseline from the same run, judged."""

from __future__ import annotations

import json

from libs.cli import main


def test_bridge_benchmark_judges_each_path_against_its_baseline(capsys) -> None:
    """Repaired and reset batches cost a small multiple of the normal path, a replayed first contact no more than the
    same batches live; an impossible replay target is missed, printed MISSED, and the exit status is 1."""
    argv = [
        "bench",
        "bridge",
        "--json",
        "--rounds",
        "3",
        "--buffered",
        "200",
        "--target",
        "first_contact_replay.vs_baseline=0.0001",
    ]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    figures = json.loads(out)
    assert "first_contact_replay.vs_baseline" in figures["missed"] and "MISSED" in err
    for key in ("normal", "repaired", "reset", "lookups_idle", "live", "first_contact_replay", "lookups_during_replay"):
        assert 0 < figures[key]["min_ms"] <= figures[key]["median_ms"] <= figures[key]["max_ms"], key
    # A loaded 2-core machine reads 0.5-2.3x for a repair or a reset and 0.4-1.0x for the replay (3 rounds); a repair
    # that waited out a timeout, or a replay that crawled, would read well past these bounds.
    assert figures["repaired"]["vs_baseline"] <= 4 and figures["reset"]["vs_baseline"] <= 4
    assert figures["first_contact_replay"]["vs_baseline"] <= 2
    assert (figures["rounds"], figures["buffered"]) == (3, 200)
