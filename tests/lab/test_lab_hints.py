"""The commands `lab up` prints fit the topology: its block size, a dense model, its run directory, its API key."""

from __future__ import annotations

import shlex
from pathlib import Path

import msgspec

from libs.lab.runstate import default_run_dir
from libs.lab.topology import load_topology
from libs.lab.up import summary


def _status(run_dir: Path, api_key: str | None = None) -> dict:
    """The parts of a ready default lab's status file that the hints read."""
    return {
        "topology": "default",
        "run_dir": str(run_dir),
        "router_url": "http://127.0.0.1:8000",
        "routers": {"dc-b": "http://127.0.0.1:8000"},
        "api_key": api_key,
        "model": "reference",
        "sites": {
            s: {"name": s, "nats_url": f"nats://127.0.0.1:{port}"} for s, port in (("dc-a", 4222), ("dc-b", 4223))
        },
        "links": [{"sites": ["dc-a", "dc-b"], "gbps": 10.0, "rtt_ms": 20.0, "loss_pct": 0.0}],
    }


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.partition("\ntry")[2].splitlines() if line.startswith("    ")]


def test_the_index_lookup_hint_names_a_custom_block_size_and_a_dense_model(tmp_path: Path) -> None:
    """A topology with 32-token blocks and a model without linear layers: the lookup says so, or it would mislead."""
    dense = msgspec.structs.replace(load_topology("default"), block_size=32, model="qwen3-235b")
    [lookup] = [c for c in _commands(summary(_status(tmp_path), dense, 1.0, detached=True)) if "index lookup" in c]
    assert " --block-size 32 " in lookup and " --no-hybrid " in lookup
    [default] = [
        c
        for c in _commands(summary(_status(tmp_path), load_topology("default"), 1.0, detached=True))
        if "index lookup" in c
    ]
    assert "--block-size" not in default and "--no-hybrid" not in default


def test_hints_name_the_run_directory_only_when_it_is_not_the_default(tmp_path: Path) -> None:
    """Lab verbs carry `--run-dir DIR` unless DIR is where they look anyway; the API key goes into the curl."""
    topology = load_topology("default")
    custom = _commands(summary(_status(tmp_path / "a b", api_key="k1"), topology, 1.0, detached=True))
    assert custom[-1] == f"prfaas lab down --run-dir {shlex.quote(str(tmp_path / 'a b'))}"
    assert custom[0].startswith("curl ") and "-H 'Authorization: Bearer k1'" in custom[0]
    plain = _commands(summary(_status(default_run_dir()), topology, 1.0, detached=False))
    assert not any("--run-dir" in c for c in plain) and plain[-1] == "prfaas lab status"
