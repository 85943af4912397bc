"""The compose lab, brought up with testcontainers' compose support and checked like the native lab.

Runs where a Docker engine (with the ``docker compose`` plugin) answers: ``pytest tests/compose``
builds the image from the root ``Dockerfile`` (a few minutes the first time), starts
``compose/docker-compose.yml``, waits for every healthcheck, runs the end-to-end checks of the
native lab against the published ports, and tears the stack down. Elsewhere it is skipped, with
the reason.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.lab.wan_server import change_link
from tests.lab.e2e import (
    Endpoints,
    check_a_slower_link_offloads_less,
    check_long_prompt_crosses_the_link,
    check_partition_loses_nothing,
    check_short_chat_stays_local,
)

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"


def _docker_unavailable() -> str | None:
    """Why the compose suite cannot run here (None: a Docker engine answers)."""
    try:
        import docker

        docker.from_env(timeout=5).ping()
    except Exception as e:  # any failure to reach an engine means: not run here
        return f"not run: no Docker engine answers here ({type(e).__name__}: {e})"
    return None


REASON = _docker_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Endpoints, str]]:
    """The compose lab running; its endpoints on the published ports, and Jaeger's query URL."""
    from testcontainers.compose import DockerCompose

    compose = DockerCompose(context=str(COMPOSE_DIR), compose_file_name="docker-compose.yml", build=True, wait=True)
    with compose:

        def url(scheme: str, service: str, port: int) -> str:
            host, published = compose.get_service_host_and_port(service, port)
            return f"{scheme}://{host}:{published}"

        yield (
            Endpoints(
                router_url=url("http", "router-dc-b", 8000),
                model="reference",
                api_key=None,
                router_site="dc-b",
                router_nats_url=url("nats", "nats-dc-b", 4222),
                link_control_url=url("http", "wan-dc-a-dc-b", 9000),
            ),
            url("http", "jaeger", 16686),
        )


def _relay_change(ep: Endpoints):
    async def change(up: bool) -> None:
        change_link(ep.link_control_url, {"up": up})

    return change


async def test_a_short_chat_completion_stays_local(stack: tuple[Endpoints, str]) -> None:
    """As natively: tokens through the OpenAI API, a local decision and its outcome on the router site's NATS."""
    await check_short_chat_stays_local(stack[0])


async def test_a_long_prompt_crosses_the_relay(stack: tuple[Endpoints, str]) -> None:
    """As natively: a ~2K-token prompt is prefilled at dc-a and its KV is counted by the relay service."""
    await check_long_prompt_crosses_the_link(stack[0])


async def test_a_partition_loses_no_request(stack: tuple[Endpoints, str]) -> None:
    """As natively: requests in flight during a cut finish locally; offloading resumes after it."""
    await check_partition_loses_nothing(stack[0], _relay_change(stack[0]))


async def test_a_slower_link_makes_adaptive_offload_less(stack: tuple[Endpoints, str]) -> None:
    """As natively: slowing the relay to 20 Mbps makes the adaptive policy offload fewer long prompts."""
    ep = stack[0]

    async def set_gbps(gbps: float) -> None:
        change_link(ep.link_control_url, {"gbps": gbps})

    await check_a_slower_link_offloads_less(ep, set_gbps, fast_gbps=10.0)


def test_every_service_sends_traces_to_jaeger(stack: tuple[Endpoints, str]) -> None:
    """After the traffic above, Jaeger knows the router, both gateways and the KV index."""
    with urllib.request.urlopen(stack[1] + "/api/services", timeout=10) as resp:
        services = set(json.loads(resp.read())["data"] or [])
    assert {"router", "prefill_gateway", "decode_gateway", "kv_index"} <= services
