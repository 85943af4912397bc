"""Gateway entry points answer a bad setting or an unreachable NATS with one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("service", ["prefill_gateway", "decode_gateway"])
@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("TIME_SCALE", "abc", "config: {prefix}TIME_SCALE='abc': expected a number"),
        ("NATS_URL", "nats://127.0.0.1:1", "upstream_timeout: cannot connect to NATS at nats://127.0.0.1:1"),
    ],
)
def test_one_line_and_exit_2(service: str, setting: str, value: str, message: str) -> None:
    """No traceback: the service names itself, the error code and the setting or dependency."""
    prefix = service.upper() + "_"
    env = {**os.environ, prefix + setting: value, prefix + "CONNECT_TIMEOUT_S": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", f"services.{service}"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"{service}: {message.format(prefix=prefix)}")
