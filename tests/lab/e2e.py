"""End-to-end checks of a running default-topology lab, shared by the native lab tests and the compose suite.

A lab is described by :class:`Endpoints`; the checks only use the OpenAI API, the router site's
NATS (decision and outcome events) and the link relay (bytes carried; changes through a callback
so the native tests can go through ``prfaas lab link``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import nats
import openai

from libs.common import subjects
from libs.common.bus import settle
from libs.lab.runstate import alive
from libs.lab.wan_server import link_figures

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 45  # ~2,000 tokens: above the 1,212 threshold
SHORT_PROMPT = "Say hello."
LinkChange = Callable[
    [bool], Awaitable[None]
]  # await change(False) cuts the dc-a <-> dc-b link, change(True) restores it
# A ~2K-token prompt's KV is ~2.2 MB; the NATS traffic crossing the relay (heartbeats, link stats) is a few KB a second.
KV_MOVING_BYTES = 64 << 10


@dataclass(frozen=True)
class Endpoints:
    """How to reach a running lab: router, model, API key, the router site's NATS, the dc-a <-> dc-b relay."""

    router_url: str
    model: str
    api_key: str | None
    router_site: str
    router_nats_url: str
    link_control_url: str


async def chat(ep: Endpoints, prompt: str, max_tokens: int = 8, system: str | None = None):
    """One chat completion through the OpenAI client."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    client = openai.AsyncOpenAI(
        base_url=ep.router_url + "/v1", api_key=ep.api_key or "unused", max_retries=0, timeout=90
    )
    async with client:
        return await client.chat.completions.create(model=ep.model, messages=messages, max_tokens=max_tokens)


class Events:
    """Decision and outcome events of the router's site, as dicts, by request id."""

    def __init__(self, ep: Endpoints) -> None:
        self.url, self.site = ep.router_nats_url, ep.router_site
        self.decisions: dict[str, list[dict]] = {}
        self.outcomes: dict[str, dict] = {}
        self._arrived: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
        self._new_decisions: asyncio.Queue[dict] = asyncio.Queue()  # first decisions, in arrival order

    async def __aenter__(self) -> Events:
        self.nc = await nats.connect(self.url, connect_timeout=5)

        async def on_decision(msg) -> None:
            event = msgspec.json.decode(msg.data)
            self.decisions.setdefault(event["request_id"], []).append(event)
            if event["attempt"] == 0:
                self._new_decisions.put_nowait(event)

        async def on_outcome(msg) -> None:
            event = msgspec.json.decode(msg.data)
            self.outcomes[event["request_id"]] = event
            self._arrived[event["request_id"]].set()

        await self.nc.subscribe(subjects.decisions(self.site), cb=on_decision)
        await self.nc.subscribe(subjects.outcomes(self.site), cb=on_outcome)
        await settle(self.nc)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def next_decision(self, timeout_s: float = 30.0) -> dict:
        """The next request's first decision event, in the order they arrived."""
        async with asyncio.timeout(timeout_s):
            return await self._new_decisions.get()

    async def outcome(self, completion_id: str, timeout_s: float = 10.0) -> dict:
        """The outcome of the request behind an OpenAI completion id (``chatcmpl-<request id>``)."""
        request_id = completion_id.removeprefix("chatcmpl-")
        async with asyncio.timeout(timeout_s):
            await self._arrived[request_id].wait()
        return self.outcomes[request_id]


def forward_bytes(ep: Endpoints) -> int:
    """Bytes the relay carried from dc-a to dc-b (the direction KV takes)."""
    figures = link_figures(ep.link_control_url)
    return next(d["bytes"] for d in figures["directions"] if (d["src"], d["dst"]) == ("dc-a", "dc-b"))


async def check_short_chat_stays_local(ep: Endpoints) -> None:
    """The openai client gets tokens; a subscriber at the router's site sees the decision (local) and the outcome."""
    async with Events(ep) as events:
        reply = await chat(ep, SHORT_PROMPT)
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
        outcome = await events.outcome(reply.id)
        assert (outcome["status"], outcome["route"]) == ("ok", "local")
        (decision,) = events.decisions[reply.id.removeprefix("chatcmpl-")]
        assert decision["route"] == "local" and decision["decision"]["prefill_site"] == ep.router_site


async def check_long_prompt_crosses_the_link(ep: Endpoints) -> None:
    """A ~2K-token prompt is prefilled at dc-a; its KV (megabytes) is counted by the dc-a -> dc-b relay.

    The adaptive policy may keep a prompt local while it sees pressure (a busy machine makes queues):
    up to five prompts are sent one after another until one is offloaded.
    """
    async with Events(ep) as events:
        for attempt in range(5):
            before = forward_bytes(ep)
            reply = await chat(ep, f"{attempt} {LONG_PROMPT}")
            outcome = await events.outcome(reply.id)
            assert outcome["status"] == "ok", outcome
            if outcome["route"] == "remote":
                break
        else:
            raise AssertionError("none of five long prompts was prefilled remotely")
    assert outcome["prefill_site"] == "dc-a"
    kv_bytes = events.decisions[reply.id.removeprefix("chatcmpl-")][0]["decision"]["transfer_bytes"]
    assert kv_bytes > 1_000_000
    assert forward_bytes(ep) - before >= kv_bytes


async def until_kv_moves(
    ep: Endpoints, since_bytes: int, at_least: int = KV_MOVING_BYTES, timeout_s: float = 30.0
) -> None:
    """Until the dc-a -> dc-b relay has carried ``at_least`` bytes more than ``since_bytes`` (KV, not heartbeats)."""
    async with asyncio.timeout(timeout_s):
        while True:  # the relay's counter is read over HTTP: poll it
            if await asyncio.to_thread(forward_bytes, ep) - since_bytes >= at_least:
                return
            await asyncio.sleep(0.005)


async def check_partition_loses_nothing(ep: Endpoints, change: LinkChange) -> None:
    """Long prompts in flight when the link is cut all finish (local fallback); once it returns, they go remote again.

    The cut comes once a decision event has sent one of them to the remote site and its KV is crossing the link.
    """
    async with Events(ep) as events:
        before = await asyncio.to_thread(forward_bytes, ep)
        in_flight: list[asyncio.Future] = []
        reasons: list[str] = []
        while True:  # the adaptive policy may keep a prompt local while it sees pressure: send another
            assert len(in_flight) < 8, f"none of eight long prompts was sent to the remote site: {reasons}"
            in_flight.append(asyncio.ensure_future(chat(ep, f"{len(in_flight)} {LONG_PROMPT}")))
            remote = await events.next_decision()
            if remote["route"] == "remote":
                break
            reasons.append(remote["decision"].get("reason", ""))
        await until_kv_moves(ep, before)
        assert remote["request_id"] not in events.outcomes, "the remote request ended before the cut"
        await change(False)
        during = await chat(ep, f"cut {LONG_PROMPT}")
        replies = await asyncio.gather(*in_flight) + [during]
        outcomes = [await events.outcome(r.id) for r in replies]
        assert all(o["status"] == "ok" for o in outcomes), outcomes
        assert outcomes[-1]["route"] in ("local", "fallback") and outcomes[-1]["prefill_site"] == ep.router_site
        await change(True)
        deadline = time.monotonic() + 30  # gateway reconnect (~1 s) and heartbeats seen again by the router
        while True:
            reply = await chat(ep, f"{time.monotonic()} {LONG_PROMPT}")
            outcome = await events.outcome(reply.id)
            assert outcome["status"] == "ok"
            if outcome["route"] == "remote":
                break
            assert time.monotonic() < deadline, "offloading did not resume within 30 s of the link's return"
            await asyncio.sleep(0.5)


LinkSpeed = Callable[[float], Awaitable[None]]  # await set_gbps(0.02) slows both directions of dc-a <-> dc-b


async def check_a_slower_link_offloads_less(ep: Endpoints, set_gbps: LinkSpeed, fast_gbps: float) -> None:
    """The adaptive policy offloads fewer of the same long prompts once the link is slowed to 20 Mbps.

    A 2K-token prompt's KV (~2 MB) crosses a 20 Mbps link in ~0.9 s, several times its local prefill:
    once a transfer has shown the slower link in the telemetry, the prompts stay local.
    """

    async def remote(tag: str, n: int, stop_at_first_remote: bool = False) -> int:
        offloaded = 0
        for i in range(n):
            reply = await chat(ep, f"{tag} {i} {LONG_PROMPT}")
            outcome = await events.outcome(reply.id, timeout_s=30)
            assert outcome["status"] == "ok", outcome
            offloaded += outcome["route"] == "remote"
            if stop_at_first_remote and offloaded:
                break
        return offloaded

    async with Events(ep) as events:
        fast = await remote("fast", 6)
        await set_gbps(0.02)
        try:
            await remote("probe", 5, stop_at_first_remote=True)  # a transfer over the slow link shows it
            slow = await remote("slow", 6)
        finally:
            await set_gbps(fast_gbps)
    assert fast >= 2, f"only {fast} of 6 long prompts went remote on the fast link"
    assert slow < fast, f"{slow} of 6 went remote on the slow link, {fast} on the fast one"


LAB_CLI = [sys.executable, "-m", "libs.cli", "lab"]


def lab_cli(run_dir: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """``prfaas lab <args> --run-dir <run_dir>``, its output captured."""
    return subprocess.run([*LAB_CLI, *args, "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def detached_lab(run_dir: Path) -> Iterator[dict]:
    """The default lab, detached, as its status; ``lab down`` afterwards leaves none of its processes."""
    up = lab_cli(run_dir, "up", "--detach", timeout=120)
    assert up.returncode == 0, up.stderr + up.stdout
    info = json.loads(lab_cli(run_dir, "status", "--json").stdout)
    try:
        yield info
    finally:
        assert lab_cli(run_dir, "down").returncode == 0
        assert not [p for p in info["processes"] if alive(p["pid"], p["start_ticks"])]
