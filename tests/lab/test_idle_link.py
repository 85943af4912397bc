"""On the default lab: remote requests on a loaded host do not make the idle 10 Gbps link read as scarce.

Busy CPU loops run beside the lab and the decode gateway (the KV receiver) gets the CPU only in
short slices, so every KV ack comes late; the link itself is idle but for a few megabytes. Once the
load is gone and the link has been idle, the next long prompt must be offloaded, reading the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import nats
import pytest

from libs.common import subjects
from libs.common.messages import LinkStats, link_stats_decoder
from tests.lab.e2e import LONG_PROMPT, Endpoints, Events, chat, detached_lab

BUSY_LOOPS = 3
STOPPED_S, RUNNING_S = 0.08, 0.02  # the receiver runs 20% of the time: its acks wait up to 80 ms


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The default lab, detached; ``lab down`` afterwards leaves none of its processes."""
    with detached_lab(tmp_path_factory.mktemp("idle-link-lab")) as info:
        yield info


@contextlib.contextmanager
def busy_loops(count: int) -> Iterator[None]:
    """``count`` child processes spinning on a core each, killed on exit."""
    children = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for child in children:
            child.kill()
            child.wait()


@contextlib.contextmanager
def starved(pid: int) -> Iterator[None]:
    """Let ``pid`` run only in short slices (SIGSTOP/SIGCONT); it runs freely again on exit."""
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            os.kill(pid, signal.SIGSTOP)
            done.wait(STOPPED_S)
            os.kill(pid, signal.SIGCONT)
            done.wait(RUNNING_S)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        os.kill(pid, signal.SIGCONT)


class LinkSamples:
    """The dc-a -> dc-b LinkStats as the router's site receives them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[LinkStats] = []
        self.arrived = asyncio.Event()

    async def __aenter__(self) -> LinkSamples:
        self.nc = await nats.connect(self.url, connect_timeout=5)

        async def keep(msg) -> None:
            self.samples.append(link_stats_decoder.decode(msg.data))
            self.arrived.set()

        await self.nc.subscribe(subjects.link("dc-a", "dc-b"), cb=keep)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def idle_for(self, samples: int, timeout_s: float) -> None:
        """Wait until the latest ``samples`` samples show no transfer and nothing acknowledged."""
        async with asyncio.timeout(timeout_s):
            while not (
                len(self.samples) >= samples
                and all(s.active_transfers == 0 and s.goodput_gbps == 0 for s in self.samples[-samples:])
            ):
                self.arrived.clear()
                await self.arrived.wait()


def _endpoints(lab: dict) -> Endpoints:
    site = next(site for site, url in lab["routers"].items() if url == lab["router_url"])
    return Endpoints(
        lab["router_url"],
        lab["model"],
        lab["api_key"],
        site,
        lab["sites"][site]["nats_url"],
        lab["links"][0]["control_url"],
    )


def _late_acks(samples: list[LinkStats]) -> bool:
    """A sample with transfers under way whose acks came more than 20 ms later than the fastest."""
    return any(s.active_transfers and s.rtt_s - s.min_rtt_s > 0.02 for s in samples if s.min_rtt_s)


async def test_after_remote_requests_on_a_loaded_host_an_idle_link_reads_its_budget(lab: dict) -> None:
    """KV acks 80 ms late beside busy loops; after the link idles, a long prompt goes remote at the 10 Gbps budget."""
    ep = _endpoints(lab)
    receiver = next(p["pid"] for p in lab["processes"] if p["role"] == "decode_gateway")
    async with Events(ep) as events, LinkSamples(ep.router_nats_url) as link:
        with busy_loops(BUSY_LOOPS), starved(receiver):
            remote = sent = 0
            # At least four long prompts, and more (up to twelve) until a LinkStats shows the precondition: acks came
            # late (what was read as queueing on a degraded link). Four can fit in one LinkStats interval.
            while sent < 4 or (sent < 12 and not _late_acks(link.samples)):
                reply = await chat(ep, f"loaded {sent} {time.time()} {LONG_PROMPT}")
                outcome = await events.outcome(reply.id, timeout_s=60)
                assert outcome["status"] == "ok", outcome
                remote += outcome["route"] == "remote"
                sent += 1
            loaded = list(link.samples)
        assert remote >= 2, f"only {remote} of {sent} long prompts crossed the link under load"
        assert _late_acks(loaded), loaded
        await link.idle_for(samples=2, timeout_s=30)
        reply = await chat(ep, f"after idling {time.time()} {LONG_PROMPT}")
        outcome = await events.outcome(reply.id, timeout_s=60)
        (decision,) = events.decisions[reply.id.removeprefix("chatcmpl-")]
    signals = decision["decision"]["signals"]
    assert outcome["route"] == "remote", decision["decision"]["reason"]
    assert signals["bandwidth"] == "plentiful" and signals["link_effective_gbps"] == 10.0, signals
