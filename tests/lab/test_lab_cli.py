"""``prfaas lab up --detach`` on the default topology, end to end: OpenAI API, decisions, the WAN link, ``lab down``."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import openai
import pytest

from libs.common import subjects
from libs.lab.runstate import alive
from libs.lab.up import DEMO_PREFIX_TEXT, DEMO_PROMPT
from libs.lab.wan_server import link_figures

PRFAAS = [sys.executable, "-m", "libs.cli"]
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 45  # ~2,000 tokens: above the 1,212 threshold
SHORT_PROMPT = "Say hello."


def _prfaas(run_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*PRFAAS, "lab", *args, "--run-dir", str(run_dir)], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The default lab, detached; after the module, ``lab down`` must leave none of its processes."""
    run_dir = tmp_path_factory.mktemp("lab")
    started = time.monotonic()
    up = _prfaas(run_dir, "up", "--detach", timeout=120)
    assert up.returncode == 0, up.stderr + up.stdout
    assert time.monotonic() - started < 60, "the default lab must be ready within 60 s"
    status = _prfaas(run_dir, "status", "--json")
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    info["up_stdout"] = up.stdout
    try:
        yield info
    finally:
        down = _prfaas(run_dir, "down", timeout=90)
        assert down.returncode == 0, down.stderr
        left = [p["name"] for p in info["processes"] + [{"name": "supervisor", **info["supervisor"]}]
                if alive(p["pid"], p["start_ticks"])]  # fmt: skip
        assert left == [], f"still running after lab down: {left}"


async def _chat(lab: dict, prompt: str, max_tokens: int = 8) -> openai.types.chat.ChatCompletion:
    client = openai.AsyncOpenAI(base_url=lab["router_url"] + "/v1", api_key=lab["api_key"] or "unused", max_retries=0,
                                timeout=90)  # fmt: skip
    async with client:
        return await client.chat.completions.create(
            model=lab["model"], messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
        )


class _Events:
    """Decision and outcome events of the router's site, as dicts, by request id."""

    def __init__(self, nats_url: str, site: str) -> None:
        self.url, self.site = nats_url, site
        self.decisions: dict[str, list[dict]] = {}
        self.outcomes: dict[str, dict] = {}
        self._arrived: dict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)

    async def __aenter__(self) -> _Events:
        self.nc = await nats.connect(self.url, connect_timeout=5)

        async def on_decision(msg) -> None:
            event = msgspec.json.decode(msg.data)
            self.decisions.setdefault(event["request_id"], []).append(event)

        async def on_outcome(msg) -> None:
            event = msgspec.json.decode(msg.data)
            self.outcomes[event["request_id"]] = event
            self._arrived[event["request_id"]].set()

        await self.nc.subscribe(subjects.decisions(self.site), cb=on_decision)
        await self.nc.subscribe(subjects.outcomes(self.site), cb=on_outcome)
        await self.nc.flush()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.nc.close()

    async def outcome(self, completion_id: str, timeout_s: float = 10.0) -> dict:
        """The outcome of the request behind an OpenAI completion id (``chatcmpl-<request id>``)."""
        request_id = completion_id.removeprefix("chatcmpl-")
        async with asyncio.timeout(timeout_s):
            await self._arrived[request_id].wait()
        return self.outcomes[request_id]


def _router_site(lab: dict) -> str:
    return next(site for site, url in lab["routers"].items() if url == lab["router_url"])


def _forward_bytes(lab: dict) -> int:
    """Bytes the relay carried from dc-a to dc-b (the direction KV takes)."""
    figures = link_figures(lab["links"][0]["control_url"])
    return next(d["bytes"] for d in figures["directions"] if (d["src"], d["dst"]) == ("dc-a", "dc-b"))


def test_status_names_the_endpoints_and_every_process(lab: dict) -> None:
    """status --json: router URL, each site's NATS URL, no API key, the run dir, every process alive."""
    assert lab["router_url"].startswith("http://127.0.0.1:")
    assert set(lab["sites"]) == {"dc-a", "dc-b"}
    assert all(site["nats_url"].startswith("nats://127.0.0.1:") for site in lab["sites"].values())
    assert lab["api_key"] is None and Path(lab["run_dir"]).is_dir()
    roles = sorted(p["role"] for p in lab["processes"])
    assert roles == sorted(["wan", "nats", "nats", "redis", "kv_index", "prefill_gateway", "prefill_gateway",
                            "decode_gateway", "router"])  # fmt: skip
    assert all(p["alive"] for p in lab["processes"]), lab["processes"]
    assert lab["router_url"] in lab["up_stdout"] and lab["sites"]["dc-a"]["nats_url"] in lab["up_stdout"]


async def test_a_short_chat_completion_stays_local_and_its_decision_is_published(lab: dict) -> None:
    """The openai client gets tokens; a subscriber at the router's site sees the decision (local) and the outcome."""
    async with _Events(lab["sites"][_router_site(lab)]["nats_url"], _router_site(lab)) as events:
        reply = await _chat(lab, SHORT_PROMPT)
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 8
        outcome = await events.outcome(reply.id)
        assert (outcome["status"], outcome["route"]) == ("ok", "local")
        (decision,) = events.decisions[reply.id.removeprefix("chatcmpl-")]
        assert decision["route"] == "local" and decision["decision"]["prefill_site"] == "dc-b"


async def test_a_long_prompt_is_prefilled_remotely_and_its_kv_crosses_the_link(lab: dict) -> None:
    """A ~2K-token prompt goes to dc-a; its KV (megabytes) is counted by the dc-a -> dc-b relay."""
    before = _forward_bytes(lab)
    async with _Events(lab["sites"][_router_site(lab)]["nats_url"], _router_site(lab)) as events:
        reply = await _chat(lab, LONG_PROMPT)
        outcome = await events.outcome(reply.id)
    assert (outcome["status"], outcome["route"], outcome["prefill_site"]) == ("ok", "remote", "dc-a")
    kv_bytes = events.decisions[reply.id.removeprefix("chatcmpl-")][0]["decision"]["transfer_bytes"]
    assert kv_bytes > 1_000_000
    assert _forward_bytes(lab) - before >= kv_bytes


async def test_a_partition_loses_no_request_and_offloading_resumes_after_it(lab: dict) -> None:
    """Long prompts in flight when the link is cut all finish (local fallback); once it returns, they go remote again."""
    run_dir = Path(lab["run_dir"])
    site = _router_site(lab)
    async with _Events(lab["sites"][site]["nats_url"], site) as events:
        in_flight = [asyncio.ensure_future(_chat(lab, f"{i} {LONG_PROMPT}")) for i in range(2)]
        await asyncio.sleep(0.3)
        cut = await asyncio.to_thread(_prfaas, run_dir, "link", "dc-a", "dc-b", "--down")
        assert cut.returncode == 0 and "DOWN (blackhole)" in cut.stdout, cut.stderr
        during = await _chat(lab, f"cut {LONG_PROMPT}")
        replies = await asyncio.gather(*in_flight) + [during]
        outcomes = [await events.outcome(r.id) for r in replies]
        assert all(o["status"] == "ok" for o in outcomes), outcomes
        assert outcomes[-1]["route"] in ("local", "fallback") and outcomes[-1]["prefill_site"] == site
        restored = await asyncio.to_thread(_prfaas, run_dir, "link", "dc-a", "dc-b", "--up")
        assert restored.returncode == 0, restored.stderr
        deadline = time.monotonic() + 30  # gateway reconnect (~1 s) and heartbeats seen again by the router
        while True:
            reply = await _chat(lab, f"{time.monotonic()} {LONG_PROMPT}")
            outcome = await events.outcome(reply.id)
            assert outcome["status"] == "ok"
            if outcome["route"] == "remote":
                break
            assert time.monotonic() < deadline, "offloading did not resume within 30 s of the link's return"
            await asyncio.sleep(0.5)


async def test_a_slower_link_makes_adaptive_offload_less(lab: dict) -> None:
    """Long prompts all go remote at 10 Gbps; at 5 Mbps (seconds per KV) the adaptive policy keeps some local."""
    run_dir = Path(lab["run_dir"])
    site = _router_site(lab)
    async with _Events(lab["sites"][site]["nats_url"], site) as events:

        async def routes(n: int, tag: str) -> list[str]:
            replies = [await _chat(lab, f"{tag} {i} {LONG_PROMPT}") for i in range(n)]
            return [(await events.outcome(r.id))["route"] for r in replies]

        assert await routes(2, "fast") == ["remote", "remote"]
        slow = await asyncio.to_thread(_prfaas, run_dir, "link", "dc-a", "dc-b", "--gbps", "0.005")
        assert slow.returncode == 0, slow.stderr
        try:
            # A 2K-token KV (~2.2 MB) now takes ~3.5 s to cross: the link's backlog, reported in
            # LinkStats every second, raises the adaptive threshold above these prompts.
            slow_routes = await routes(6, "slow")
        finally:
            restored = await asyncio.to_thread(_prfaas, run_dir, "link", "dc-a", "dc-b", "--gbps", "10")
            assert restored.returncode == 0, restored.stderr
        assert slow_routes.count("remote") <= 2, slow_routes  # the first goes before any LinkStats shows the slowdown


async def test_the_suggested_index_lookup_finds_the_demo_chat_prefix(lab: dict) -> None:
    """After a chat with the demo system prompt, `prfaas index lookup` of the printed text finds its blocks at dc-b."""
    assert f"prfaas index lookup --nats {lab['sites']['dc-a']['nats_url']} --text {shlex.quote(DEMO_PREFIX_TEXT)}" in lab["up_stdout"]
    client = openai.AsyncOpenAI(base_url=lab["router_url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
    async with client:
        await client.chat.completions.create(model=lab["model"], max_tokens=4, messages=[
            {"role": "system", "content": DEMO_PROMPT}, {"role": "user", "content": "Hello!"}])  # fmt: skip
    full_blocks = len(DEMO_PREFIX_TEXT.encode()) // 64  # BOS + bytes; whole blocks only
    deadline = time.monotonic() + 15
    while True:
        lookup = await asyncio.to_thread(subprocess.run, [*PRFAAS, "index", "lookup", "--nats",
                                         lab["sites"]["dc-a"]["nats_url"], "--text", DEMO_PREFIX_TEXT],
                                         capture_output=True, text=True, timeout=30)  # fmt: skip
        assert lookup.returncode == 0, lookup.stderr
        held = {(i["site"], i["instance"]): i["usable_blocks"] for i in json.loads(lookup.stdout)["instances"]}
        if held.get(("dc-b", "pd-p0")) == full_blocks:
            break
        assert time.monotonic() < deadline, f"the index never showed the demo prefix: {held}"
        await asyncio.sleep(0.3)


def test_a_second_lab_in_the_same_run_dir_is_refused(lab: dict) -> None:
    """While a lab runs, `lab up` in its run dir exits 2 with one line naming the directory."""
    second = _prfaas(Path(lab["run_dir"]), "up", "--detach")
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"prfaas: config: a lab is already running in {lab['run_dir']} (supervisor pid {lab['supervisor']['pid']}): "
        "stop it with `prfaas lab down` or choose another --run-dir"
    ]


def test_link_changes_reach_the_relay_and_bad_ones_are_refused(lab: dict) -> None:
    """`lab link` sets bandwidth and RTT live; a link that does not exist or an empty change is one clear error."""
    run_dir = Path(lab["run_dir"])
    slower = _prfaas(run_dir, "link", "dc-b", "dc-a", "--gbps", "2", "--rtt-ms", "30")
    assert slower.returncode == 0, slower.stderr
    directions = link_figures(lab["links"][0]["control_url"])["directions"]
    assert [(d["gbps"], d["delay_ms"]) for d in directions] == [(2.0, 15.0), (2.0, 15.0)]
    restore = _prfaas(run_dir, "link", "dc-a", "dc-b", "--gbps", "10", "--rtt-ms", "20")
    assert restore.returncode == 0, restore.stderr
    missing = _prfaas(run_dir, "link", "dc-a", "dc-z", "--gbps", "1")
    assert missing.returncode == 2 and "no link between dc-a and dc-z" in missing.stderr
    empty = _prfaas(run_dir, "link", "dc-a", "dc-b")
    assert empty.returncode == 2 and "nothing to change" in empty.stderr


def test_status_and_down_without_a_lab(tmp_path: Path) -> None:
    """No lab in the run dir: status says so and exits 1, down is a no-op, link is refused."""
    status = _prfaas(tmp_path, "status")
    assert status.returncode == 2 and f"no lab in {tmp_path}" in status.stderr
    down = _prfaas(tmp_path, "down")
    assert down.returncode == 0 and f"no lab in {tmp_path}" in down.stderr
    link = _prfaas(tmp_path, "link", "dc-a", "dc-b", "--down")
    assert link.returncode == 2 and f"no lab runs in {tmp_path}" in link.stderr


def test_a_foreground_lab_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """`lab up` in the foreground: SIGTERM once ready stops every process it started and exits 0."""
    lab = subprocess.Popen([*PRFAAS, "lab", "up", "--run-dir", str(tmp_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    try:
        first_line = lab.stdout.readline()
        assert "is up in" in first_line, lab.stderr.read() if lab.poll() is not None else first_line
        status = json.loads((tmp_path / "status.json").read_text())
        pids = [(p["pid"], p["start_ticks"]) for p in status["processes"]]
        assert all(alive(*p) for p in pids)
        lab.terminate()
        assert lab.wait(timeout=60) == 0
        assert [pid for pid, ticks in pids if alive(pid, ticks)] == []
        assert json.loads((tmp_path / "status.json").read_text())["state"] == "stopped"
    finally:
        if lab.poll() is None:
            lab.kill()
            lab.wait()
