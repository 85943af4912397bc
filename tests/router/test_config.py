"""Router settings from the environment: required keys and inconsistent values are errors naming the key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from libs.common.errors import ConfigError
from services.router.config import RouterConfig


def test_threshold_is_required():
    """Without ROUTER_THRESHOLD_TOKENS the router does not start on a guessed t; with it, t is taken as given."""
    with pytest.raises(ConfigError, match="ROUTER_THRESHOLD_TOKENS is required"):
        RouterConfig.from_env({})
    assert RouterConfig.from_env({"ROUTER_THRESHOLD_TOKENS": "1212"}).threshold_tokens == 1212
    with pytest.raises(ConfigError, match="ROUTER_THRESHOLD_TOKENS='-1'"):
        RouterConfig.from_env({"ROUTER_THRESHOLD_TOKENS": "-1"})


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"ROUTER_INDEX_MIN_TIMEOUT_S": "0.5", "ROUTER_INDEX_TIMEOUT_S": "0.1"}, "ROUTER_INDEX_MIN_TIMEOUT_S=0.5"),
        ({"ROUTER_LEASE_MARGIN": "0.5"}, "ROUTER_LEASE_MARGIN='0.5'"),
        ({"ROUTER_POLICY": "round-robin"}, "ROUTER_POLICY='round-robin'"),
    ],
)
def test_bad_values_name_their_key(env, key):
    """A value out of range or inconsistent with another is refused with the key and the value."""
    with pytest.raises(ConfigError, match=key):
        RouterConfig.from_env({"ROUTER_THRESHOLD_TOKENS": "100"} | env)


def test_entry_point_refuses_a_missing_threshold_in_one_line():
    """``python -m services.router`` without ROUTER_THRESHOLD_TOKENS: one line naming the key, exit code 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTER_")}
    proc = subprocess.run(
        [sys.executable, "-m", "services.router"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("router: config: ROUTER_THRESHOLD_TOKENS is required")


def test_the_first_token_wait_follows_the_job_deadline():
    """Unset, an attempt waits for its first token as long as the decode side may (its job deadline and a grace)."""
    base = {"ROUTER_THRESHOLD_TOKENS": "100"}
    assert RouterConfig.from_env(base | {"ROUTER_JOB_TIMEOUT_S": "300"}).first_token_wait_s == 305.0
    assert RouterConfig.from_env(base | {"ROUTER_FIRST_TOKEN_TIMEOUT_S": "20"}).first_token_wait_s == 20.0


def test_breaker_settings_are_read_and_checked():
    """ROUTER_BREAKER_* reach the link breakers; an inconsistent pair is refused naming the breaker."""
    base = {"ROUTER_THRESHOLD_TOKENS": "100"}
    cfg = RouterConfig.from_env(base | {"ROUTER_BREAKER_FAILURES": "3", "ROUTER_BREAKER_SILENCE_S": "2.5"})
    assert (cfg.breaker.failures, cfg.breaker.silence_s) == (3, 2.5)
    with pytest.raises(ConfigError, match="ROUTER_BREAKER_.*max_hold_s"):
        RouterConfig.from_env(base | {"ROUTER_BREAKER_HOLD_S": "60"})
