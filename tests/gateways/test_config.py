"""Gateway settings: defaults that run, and errors that name the key, the bad value and why."""

from __future__ import annotations

import subprocess
import sys

import pytest

from libs.common.errors import ConfigError
from libs.engine.backends import ReferenceBackend
from libs.engine.build import build_backend
from libs.engine.simulated import SimulatedBackend
from services.decode_gateway.config import DecodeGatewayConfig
from services.prefill_gateway.config import PrefillGatewayConfig


def test_defaults_and_settings_are_read():
    """Unset keys keep their defaults; set ones are parsed (budgets per site, instance lists, simulated chips)."""
    assert DecodeGatewayConfig.from_env({}).backend.backend == "reference"
    cfg = PrefillGatewayConfig.from_env(
        {
            "PREFILL_GATEWAY_INSTANCES": "p0, p1",
            "PREFILL_GATEWAY_BACKEND": "simulated:b200",
            "PREFILL_GATEWAY_MODEL": "qwen3.5-397b",
            "PREFILL_GATEWAY_TIME_SCALE": "0.01",
            "PREFILL_GATEWAY_BUDGETS": "dc-pd=10, dc-eu=2.5",
        }
    )
    assert cfg.instances == ("p0", "p1") and dict(cfg.budgets_gbps) == {"dc-pd": 10.0, "dc-eu": 2.5}
    backend = build_backend(cfg.backend)
    assert isinstance(backend, SimulatedBackend) and backend.name == "sim:qwen3.5-397b@b200"
    assert isinstance(build_backend(DecodeGatewayConfig.from_env({}).backend), ReferenceBackend)
    decode = DecodeGatewayConfig.from_env({"DECODE_GATEWAY_ADVERTISE_BY_SITE": "dc-prfaas=10.0.0.7:7001"})
    assert dict(decode.advertise_by_site) == {"dc-prfaas": ("10.0.0.7", 7001)}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"DECODE_GATEWAY_BACKEND": "simulated:rubin-cpx"},
            "DECODE_GATEWAY_BACKEND='simulated:rubin-cpx'.*prefill-only",
        ),
        (
            {"DECODE_GATEWAY_BACKEND": "simulated:groq-lpu", "DECODE_GATEWAY_MAX_BATCH": "4096"},
            r"DECODE_GATEWAY_MAX_BATCH=4096: simulated:groq-lpu decodes at most 16 sequences .*small batches, fast steps of",
        ),
        (
            {"DECODE_GATEWAY_BACKEND": "tpu"},
            "DECODE_GATEWAY_BACKEND='tpu': expected 'reference' or 'simulated:<hardware>'",
        ),
        ({"DECODE_GATEWAY_MODEL": "gpt-17"}, "DECODE_GATEWAY_MODEL='gpt-17'"),
        ({"DECODE_GATEWAY_MODEL": "qwen3-235b"}, "DECODE_GATEWAY_MODEL='qwen3-235b': the reference backend serves"),
        ({"DECODE_GATEWAY_TRANSPORTS": "tcp,rdma"}, "DECODE_GATEWAY_TRANSPORTS='tcp,rdma'"),
        ({"DECODE_GATEWAY_LEASE_S": "soon"}, "DECODE_GATEWAY_LEASE_S='soon': expected a number"),
        ({"DECODE_GATEWAY_SITE": "dc.pd"}, "DECODE_GATEWAY_SITE='dc.pd'"),
        ({"DECODE_GATEWAY_ADVERTISE_BY_SITE": "dc-prfaas=relay"}, "DECODE_GATEWAY_ADVERTISE_BY_SITE='dc-prfaas=relay'"),
    ],
)
def test_decode_config_errors_name_the_key_and_the_reason(env, message):
    """A prefill-only chip, a batch over the chip's limit, unknown names: ConfigError naming key and value."""
    with pytest.raises(ConfigError, match=message):
        DecodeGatewayConfig.from_env(env)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"PREFILL_GATEWAY_INSTANCES": "p0,p1"},
            "PREFILL_GATEWAY_INSTANCES='p0,p1': a reference-model instance is one process",
        ),
        ({"PREFILL_GATEWAY_INSTANCES": "p0,p0", "PREFILL_GATEWAY_BACKEND": "simulated:h200"}, "distinct"),
        ({"PREFILL_GATEWAY_BUDGETS": "dc-pd:10"}, "PREFILL_GATEWAY_BUDGETS='dc-pd:10': 'dc-pd:10' is not of the form"),
        ({"PREFILL_GATEWAY_CODEC": "lz4"}, "PREFILL_GATEWAY_CODEC='lz4'"),
        ({"PREFILL_GATEWAY_QUEUE_LIMIT": "0"}, "PREFILL_GATEWAY_QUEUE_LIMIT='0': expected an integer >= 1"),
        ({"PREFILL_GATEWAY_BYTE_SCALE": "0"}, "PREFILL_GATEWAY_BYTE_SCALE=0.0"),
    ],
)
def test_prefill_config_errors_name_the_key_and_the_reason(env, message):
    """Bad prefill settings are ConfigErrors naming the key and the value."""
    with pytest.raises(ConfigError, match=message):
        PrefillGatewayConfig.from_env(env)


def test_a_misconfigured_gateway_exits_with_the_reason():
    """``python -m services.decode_gateway`` on a prefill-only chip exits non-zero and says why, before connecting."""
    env = {"DECODE_GATEWAY_BACKEND": "simulated:rubin-cpx", "DECODE_GATEWAY_NATS_URL": "nats://127.0.0.1:1", "PATH": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "services.decode_gateway"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "prefill-only" in proc.stderr
