"""`prfaas index lookup`, `prfaas bench kvindex` and `python -m services.kv_index`: clear answers, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from libs.lab.servers import free_port

PRFAAS = [sys.executable, "-m", "libs.cli"]


def _lookup(nats_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PRFAAS, "index", "lookup", "--nats", nats_url, *args], capture_output=True, text=True, timeout=60
    )


def test_lookup_without_a_server_is_a_clear_error():
    """No NATS at the URL: exit code 2 and a message naming the URL, within the deadline."""
    url = f"nats://127.0.0.1:{free_port()}"
    result = _lookup(url, "--tokens", "1,2,3", "--timeout-s", "0.5")
    assert result.returncode == 2 and url in result.stderr


def test_kvindex_benchmark_prints_its_figures_as_json():
    """A tiny run of the benchmark prints its three figures (lookup p50, p99, ingest rate)."""
    result = subprocess.run(
        [
            *PRFAAS,
            "bench",
            "kvindex",
            "--blocks",
            "4096",
            "--instances",
            "4",
            "--prompt-blocks",
            "64",
            "--lookups",
            "20",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["lookup_p50_ms"] > 0 and figures["lookup_p99_ms"] >= figures["lookup_p50_ms"]
    assert figures["ingest_events_per_s"] > 0
    assert figures["instances_holding_prompt"] == 4 and figures["best_usable_blocks"] == 64


KV_INDEX = [sys.executable, "-m", "services.kv_index"]


def _kv_index(env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KV_INDEX_")}
    return subprocess.run(
        KV_INDEX, env={**clean, "KV_INDEX_CONNECT_TIMEOUT_S": "0.5", **env}, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("BLOCK_SIZE", "sixty-four", "KV_INDEX_BLOCK_SIZE='sixty-four': expected an integer"),
        ("LOOKUP_TIMEOUT_S", "-1", "KV_INDEX_LOOKUP_TIMEOUT_S='-1'"),
        ("LOG_LEVEL", "loud", "KV_INDEX_LOG_LEVEL='loud'"),
        ("NATS_URL", "http://127.0.0.1:4222", "KV_INDEX_NATS_URL='http://127.0.0.1:4222'"),
        ("ZMQ_ENDPOINTS", "tcp://h:5557|h:5558=dc/vllm-0", "KV_INDEX_ZMQ_ENDPOINTS: 'tcp://h:5557|h:5558=dc/vllm-0'"),
    ],
)
def test_service_names_a_bad_setting_in_one_line(key, value, expected):
    """A bad KV_INDEX_* value: exit code 2 and one line on stderr naming the key and the value."""
    result = _kv_index({f"KV_INDEX_{key}": value})
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"kv_index: config: {expected}")


def test_service_with_unreachable_dependencies_says_so_in_one_line(redis_url):
    """Redis or NATS unreachable at start: exit code 2 and one line on stderr naming the URL, within the deadline."""
    nats = f"nats://127.0.0.1:{free_port()}"
    for env, url in (
        ({"KV_INDEX_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, "redis://127.0.0.1:"),
        ({"KV_INDEX_REDIS_URL": redis_url, "KV_INDEX_NATS_URL": nats}, nats),
    ):
        start = time.monotonic()
        result = _kv_index(env)
        # The 0.5 s connect deadline plus interpreter start-up; 20 s leaves room on a loaded 2-core box.
        assert 0.5 <= time.monotonic() - start < 20
        assert result.returncode == 2
        (line,) = result.stderr.splitlines()
        assert line.startswith("kv_index: upstream_timeout: cannot ") and url in line
