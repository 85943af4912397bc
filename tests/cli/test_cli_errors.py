"""The `prfaas` command answers bad arguments and unusable paths with one clear line."""

from __future__ import annotations

import pytest

from libs.cli import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tokens", "1,2", "--timeout-s", "-1"], "--timeout-s must be positive, got -1.0"),
        (["--tokens", "1,2", "--timeout-s", "0"], "--timeout-s must be positive, got 0.0"),
        (["--tokens", "1,x"], "--tokens must be comma-separated integers, got '1,x'"),
        (["--tokens", "1", "--block-size", "0"], "--block-size must be positive, got 0"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(capsys, argv: list[str], message: str) -> None:
    """Exit code 2 and a single ``prfaas: bad_request: ...`` line naming the flag."""
    assert main(["index", "lookup", "--nats", "nats://127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"prfaas: bad_request: {message}"]


def test_an_unwritable_output_path_is_one_line(capsys) -> None:
    """A file the user named that cannot be written ends the command with one line naming it."""
    assert main(["plan", "--case-study", "--plot", "/nonexistent-dir/p.png"]) in (1, 2)
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("prfaas: ") and "/nonexistent-dir" in line
