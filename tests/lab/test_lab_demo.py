"""`prfaas lab demo`: a lab of the topology asked for, a sample answer, quiet progress in logs, and a failing exit
when a lab built to offload offloaded nothing."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

from libs.lab.demo_report import Progress, Result, sample_line
from libs.lab.runstate import alive

PRFAAS = [sys.executable, "-m", "libs.cli"]
_PROGRESS = re.compile(r"^\[\s*\d+/\d+\] ")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _result(ok: bool = True) -> Result:
    return Result("local", 1000, 0, 8, 0.2, ok, "an answer")


def test_progress_is_a_line_per_request_on_a_terminal_and_a_tenth_at_a_time_elsewhere() -> None:
    """100 requests: 100 lines on a terminal; into a file or pipe 10 lines, plus one per failed request."""
    terminal, log = _Terminal(), io.StringIO()
    on_terminal, in_log = Progress(100, terminal), Progress(100, log)
    for i in range(100):
        on_terminal(_result())
        in_log(_result(ok=i != 42))
    assert len(terminal.getvalue().splitlines()) == 100
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("[100/100]") and sum("FAILED" in line for line in lines) == 1


def test_a_sample_answer_is_one_printable_line_cut_at_a_word() -> None:
    """Newlines and control bytes do not reach the terminal; a long answer is cut at a word with what was left out."""
    text = "first line\nsecond\x07 line " + "word " * 100
    line = sample_line(text, limit_chars=80)
    assert line.isprintable() and line.startswith("first line second line word")
    assert len(line) <= 120 and line.endswith("more characters)") and "word …" in line
    assert sample_line("  short\tanswer ") == "short answer" and sample_line("") == "(no text)"


def test_a_lab_built_to_offload_that_offloads_nothing_fails_the_demo(tmp_path: Path) -> None:
    """`--topology FILE`: that lab starts; with a local-only router nothing goes to dc-a, so the demo exits 1 and
    says why, after its sample answer; progress into a pipe stays short; the lab is stopped and its logs kept."""
    source = (Path(__file__).resolve().parents[2] / "libs/lab/topologies/default.toml").read_text()
    topology = tmp_path / "local-only.toml"
    topology.write_text(
        source.replace('policy = "adaptive"', 'policy = "local-only"').replace(
            'name = "default"', 'name = "local-only"'
        )
    )
    run_dir = tmp_path / "run"
    demo = subprocess.run(
        [
            *PRFAAS,
            "lab",
            "demo",
            "--topology",
            str(topology),
            "--requests",
            "12",
            "--concurrency",
            "4",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert demo.returncode == 1, demo.stdout + demo.stderr
    assert f"starting the {str(topology)!r} topology" in demo.stderr
    assert "prfaas lab demo: nothing was offloaded, although" in demo.stderr and "dc-a" in demo.stderr
    assert "offloaded         0 = 0%" in demo.stdout and "sample answer " in demo.stdout
    assert sum(bool(_PROGRESS.match(line)) for line in demo.stdout.splitlines()) == 6  # every second of 12
    status = json.loads((run_dir / "status.json").read_text())
    assert status["topology"] == "local-only" and status["state"] == "stopped"
    assert [p["name"] for p in status["processes"] if alive(p["pid"], p["start_ticks"])] == []
    assert (run_dir / "logs").is_dir()
