"""What a new user meets first: usage of the command they typed, ``--version``, a quick start, ``lab down`` alone."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from libs.cli import main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("numpy", "matplotlib", "opentelemetry", "aiohttp", "openai")
_IMPORTED = """
import json, sys
from libs.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})), file=sys.stderr)
"""


def _top_level_modules_after(*argv: str) -> set[str]:
    """The top-level packages imported by ``prfaas ARGV`` in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORTED, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    return set(json.loads(done.stderr.strip().splitlines()[-1]))


def _stopped_lab(run_dir: Path) -> Path:
    """A run directory holding the status file of a lab whose processes are gone (as `lab down` leaves it)."""
    dead = {"pid": 2**22 + 1, "start_ticks": 1}  # above the default pid_max: no such process
    status = {
        "state": "stopped",
        "error": None,
        "topology": "default",
        "run_dir": str(run_dir),
        "supervisor": dead,
        "router_url": "http://127.0.0.1:9",
        "routers": {"dc-b": "http://127.0.0.1:9"},
        "api_key": None,
        "model": "reference",
        "threshold_tokens": 1212,
        "sites": {
            s: {"name": s, "nats_url": "nats://127.0.0.1:9", "monitor_url": "http://127.0.0.1:9"}
            for s in ("dc-a", "dc-b")
        },
        "links": [
            {
                "sites": ["dc-a", "dc-b"],
                "control_url": "http://127.0.0.1:9",
                "gbps": 10.0,
                "rtt_ms": 20.0,
                "loss_pct": 0.0,
            }
        ],
        "processes": [
            {
                "name": "router-dc-b",
                "role": "router",
                "site": "dc-b",
                **dead,
                "ready": True,
                "exit_code": 0,
                "log": str(run_dir / "logs/router-dc-b.log"),
            }
        ],
    }
    (run_dir / "status.json").write_text(json.dumps(status))
    return run_dir


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["lab", "up", "--bogus"], "usage: prfaas lab up "),
        (["lab", "status", "--bogus"], "usage: prfaas lab status "),
        (["decisions", "summary", "--bogus"], "usage: prfaas decisions summary "),
        (["index", "lookup", "--text", "hi", "--bogus"], "usage: prfaas index lookup "),
        (["plan", "--bogus"], "usage: prfaas plan "),
    ],
)
def test_a_bad_flag_prints_the_usage_of_the_command_typed(capsys, argv: list[str], usage: str) -> None:
    """An unknown flag is refused by the sub-command it was given to, with that sub-command's usage."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert "unrecognized arguments: --bogus" in err


def test_version_prints_the_installed_version() -> None:
    """``prfaas --version`` prints the project's version and exits 0."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    done = subprocess.run(
        [sys.executable, "-m", "libs.cli", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert (done.returncode, done.stdout) == (0, f"prfaas {version}\n"), done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["lab", "--help"], ["lab", "status"], ["lab", "down"]])
def test_help_and_lab_status_import_no_heavy_library(tmp_path: Path, argv: list[str]) -> None:
    """`prfaas --help` and the light lab verbs import none of numpy, matplotlib, OpenTelemetry, aiohttp, openai."""
    if argv[0] == "lab" and argv[1] != "--help":
        argv = [*argv, "--run-dir", str(_stopped_lab(tmp_path))]
    assert _top_level_modules_after(*argv).isdisjoint(HEAVY)


def test_index_help_imports_no_nats_client_nor_telemetry() -> None:
    """`prfaas index --help` leaves the NATS client (and its aiohttp) and OpenTelemetry to the lookup itself."""
    assert _top_level_modules_after("index", "lookup", "--help").isdisjoint({"nats", "aiohttp", "opentelemetry"})


def test_lab_down_without_a_running_lab_says_so_and_fails(tmp_path: Path, capsys) -> None:
    """`lab down` where no lab runs (no status file, or a stopped lab's) is one line and a non-zero exit."""
    empty = tmp_path / "empty"
    empty.mkdir()
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    for run_dir in (empty, _stopped_lab(stopped)):
        assert main(["lab", "down", "--run-dir", str(run_dir)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"prfaas: not_found: no lab runs in {run_dir}"]


@pytest.mark.parametrize("verb", ["tail", "summary"])
def test_decisions_without_nats_or_a_running_lab_say_how_to_name_one(tmp_path: Path, capsys, verb: str) -> None:
    """No --nats and no lab in the run directory: one line at once, naming both ways, instead of a 5 s timeout."""
    assert main(["decisions", verb, "--run-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"prfaas: not_found: no lab runs in {tmp_path}: start one with `prfaas lab up --detach`, or give --nats URL"
    ]
