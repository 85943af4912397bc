"""``prfaas lab`` never attaches to a stranger's server and leaves no work directory behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from libs.common.errors import ConfigError
from libs.lab.servers import NatsServer, RedisServer

PRFAAS = [sys.executable, "-m", "libs.cli"]


def test_a_taken_port_is_refused_not_shared(redis_server: RedisServer, tmp_path: Path) -> None:
    """A second lab on the Redis port of a running one exits non-zero with one line naming the port."""
    lab = subprocess.run(
        [*PRFAAS, "lab", "--redis-port", str(redis_server.port), "--duration-s", "5"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert lab.returncode == 2
    errors = [line for line in lab.stderr.splitlines() if line.startswith("prfaas:")]
    assert errors == [f"prfaas: config: redis-server: port {redis_server.port} is already in use "
                      "(another lab or server?); choose another port"]  # fmt: skip


def test_servers_refuse_taken_ports(nats_server: NatsServer, tmp_path: Path) -> None:
    """Starting a server on a port another process holds is a ConfigError, whoever holds it."""
    with pytest.raises(ConfigError, match=f"port {nats_server.port} is already in use"):
        NatsServer(workdir=tmp_path / "n2", port=nats_server.port).start()
    with pytest.raises(ConfigError, match=f"port {nats_server.port} is already in use"):
        RedisServer(workdir=tmp_path / "r2", port=nats_server.port).start()


def test_clean_exit_removes_the_temp_work_dir(tmp_path: Path) -> None:
    """A lab on free ports that ends cleanly says where its logs were and removes them."""
    lab = subprocess.run(
        [*PRFAAS, "lab", "--duration-s", "1", "--no-demo"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    assert lab.returncode == 0, lab.stderr
    assert f"(logs in {tmp_path}/prfaas-lab-" in lab.stderr
    assert list(tmp_path.iterdir()) == []
