"""``prfaas lab up --detach`` on the default topology, end to end: OpenAI API, decisions, the WAN link, ``lab down``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from libs.lab.runstate import alive
from libs.lab.up import DEMO_PREFIX_TEXT, DEMO_PROMPT
from libs.lab.wan_server import link_figures
from tests.lab.e2e import (
    Endpoints,
    chat,
    check_a_slower_link_offloads_less,
    check_long_prompt_crosses_the_link,
    check_partition_loses_nothing,
    check_short_chat_stays_local,
)

PRFAAS = [sys.executable, "-m", "libs.cli"]


def _prfaas(run_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*PRFAAS, "lab", *args, "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=timeout
    )


def _hints(up_stdout: str) -> list[str]:
    """The commands `lab up` suggests: the lines indented by four spaces after its ``try`` line."""
    return [line[4:] for line in up_stdout.partition("\ntry")[2].splitlines() if line.startswith("    ")]


def _run_hint(command: str) -> subprocess.CompletedProcess:
    """``command`` run by bash as a user would paste it (``prfaas`` on the PATH, as after ``pip install``)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=60)


def check_hints(up_stdout: str, status: dict) -> None:
    """Run every hint but the last (bash, one line each); the last stops the lab in its run directory."""
    hints = _hints(up_stdout)
    assert len(hints) >= 5, up_stdout
    assert hints[-1] == f"prfaas lab down --run-dir {shlex.quote(status['run_dir'])}", up_stdout
    for hint in hints[:-1]:
        done = _run_hint(hint)
        assert done.returncode == 0 and done.stdout.strip(), f"{hint}\n{done.stdout}{done.stderr}"
        assert not hint.startswith("curl ") or '"choices"' in done.stdout, f"{hint}\n{done.stdout}"
    link = status["links"][0]
    restore = _prfaas(
        Path(status["run_dir"]), "link", *link["sites"], "--gbps", str(link["gbps"]), "--rtt-ms", str(link["rtt_ms"])
    )
    assert restore.returncode == 0, restore.stderr


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
        left = [
            p["name"]
            for p in info["processes"] + [{"name": "supervisor", **info["supervisor"]}]
            if alive(p["pid"], p["start_ticks"])
        ]
        assert left == [], f"still running after lab down: {left}"


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


def _link_cli(lab: dict):
    """A link change through `prfaas lab link dc-a dc-b ...` (checking what it prints)."""

    async def change(up: bool) -> None:
        done = await asyncio.to_thread(
            _prfaas, Path(lab["run_dir"]), "link", "dc-a", "dc-b", "--up" if up else "--down"
        )
        assert done.returncode == 0, done.stderr
        assert ("DOWN (blackhole)" in done.stdout) == (not up), done.stdout

    return change


def test_status_names_the_endpoints_and_every_process(lab: dict) -> None:
    """status --json: router URL, each site's NATS URL (as the lab's tools' user), no API key, the run dir, every process alive."""
    assert lab["router_url"].startswith("http://127.0.0.1:")
    assert set(lab["sites"]) == {"dc-a", "dc-b"}
    assert all(re.match(r"nats://lab:[\w-]+@127\.0\.0\.1:\d+$", site["nats_url"]) for site in lab["sites"].values())
    assert lab["api_key"] is None and Path(lab["run_dir"]).is_dir()
    roles = sorted(p["role"] for p in lab["processes"])
    assert roles == sorted(
        ["wan", "nats", "nats", "redis", "kv_index", "prefill_gateway", "prefill_gateway", "decode_gateway", "router"]
    )
    assert all(p["alive"] for p in lab["processes"]), lab["processes"]
    assert lab["router_url"] in lab["up_stdout"] and lab["sites"]["dc-a"]["nats_url"] in lab["up_stdout"]


def _gateways_up(lab: dict) -> bool:
    """True when dc-a has its gateway connections to dc-b both ways."""
    with urllib.request.urlopen(lab["sites"]["dc-a"]["monitor_url"] + "/gatewayz", timeout=2) as resp:
        gw = json.loads(resp.read())
    return "dc-b" in (gw.get("outbound_gateways") or {}) and "dc-b" in (gw.get("inbound_gateways") or {})


def _seconds_until(condition, timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s:g}s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_the_nats_gateways_cross_the_relay_and_notice_a_cut_within_seconds(lab: dict) -> None:
    """Both gateway connections go through the relay; a blackhole drops them within ~3 s, `--up` restores them."""
    assert _gateways_up(lab) and link_figures(lab["links"][0]["control_url"])["connections"] >= 2
    run_dir = Path(lab["run_dir"])
    assert _prfaas(run_dir, "link", "dc-a", "dc-b", "--down").returncode == 0
    try:
        # Pings every 1 s, two missed: 2-3 s (NATS's default, 2 minutes, would miss the 6 s bound).
        assert _seconds_until(lambda: not _gateways_up(lab), timeout_s=6.0) >= 1.0
    finally:
        assert _prfaas(run_dir, "link", "dc-a", "dc-b", "--up").returncode == 0
    _seconds_until(lambda: _gateways_up(lab), timeout_s=10.0)  # explicit gateways redial every second


async def test_status_shows_each_links_live_goodput_use_and_open_connections(lab: dict) -> None:
    """status: per direction its live goodput (a remote prefill's KV shows on dc-a -> dc-b), use and connections."""
    run_dir = Path(lab["run_dir"])
    done = await asyncio.to_thread(_prfaas, run_dir, "status", "--json")
    assert done.returncode == 0, done.stderr
    live = {d["src"]: d for d in json.loads(done.stdout)["links"][0]["live"]["directions"]}
    for d in live.values():  # each site's NATS server keeps its gateway connection to the other through the relay
        assert d["connections"] >= 1 and d["utilization"] == pytest.approx(d["goodput_gbps"] / d["gbps"]), d
    text = await asyncio.to_thread(_prfaas, run_dir, "status")
    assert "dc-a->dc-b" in text.stdout and "Gbps now" in text.stdout and "connections open" in text.stdout, text.stdout
    seen: list[float] = []

    async def watch() -> None:  # the relay's figures, which status shows, are read over HTTP: poll them
        while True:
            figures = await asyncio.to_thread(link_figures, lab["links"][0]["control_url"])
            seen.append(next(d["goodput_gbps"] for d in figures["directions"] if d["src"] == "dc-a"))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        await check_long_prompt_crosses_the_link(_endpoints(lab))  # >1 MB of KV crosses within a second
        await asyncio.sleep(0.2)  # a few more readings while the KV is still inside the last second
    finally:
        watcher.cancel()
    # Lower bound: 1 MB in the last second is 0.008 Gbps (NATS chatter is a few kB/s); upper: the 10 Gbps link.
    assert 0.008 <= max(seen) <= 10.0 * 1.05, seen


async def test_a_short_chat_completion_stays_local_and_its_decision_is_published(lab: dict) -> None:
    """The openai client gets tokens; a subscriber at the router's site sees the decision (local) and the outcome."""
    await check_short_chat_stays_local(_endpoints(lab))


async def test_a_long_prompt_is_prefilled_remotely_and_its_kv_crosses_the_link(lab: dict) -> None:
    """A ~2K-token prompt goes to dc-a; its KV (megabytes) is counted by the dc-a -> dc-b relay."""
    await check_long_prompt_crosses_the_link(_endpoints(lab))


async def test_a_partition_loses_no_request_and_offloading_resumes_after_it(lab: dict) -> None:
    """Long prompts in flight when `lab link --down` cuts the link all finish; after `--up` they go remote again."""
    await check_partition_loses_nothing(_endpoints(lab), _link_cli(lab))


async def test_a_slower_link_makes_adaptive_offload_less(lab: dict) -> None:
    """`lab link --gbps 0.02` (from 10): the same long prompts are offloaded less by the adaptive policy."""
    assert lab["links"][0]["gbps"] == 10.0

    async def set_gbps(gbps: float) -> None:
        done = await asyncio.to_thread(_prfaas, Path(lab["run_dir"]), "link", "dc-a", "dc-b", "--gbps", str(gbps))
        assert done.returncode == 0, done.stderr

    await check_a_slower_link_offloads_less(_endpoints(lab), set_gbps, fast_gbps=10.0)


async def test_the_suggested_index_lookup_finds_the_demo_chat_prefix(lab: dict) -> None:
    """After a chat with the demo system prompt, the printed `prfaas index lookup` finds its blocks at dc-b."""
    [lookup] = [hint for hint in _hints(lab["up_stdout"]) if hint.startswith("prfaas index lookup ")]
    await chat(_endpoints(lab), "Hello!", max_tokens=4, system=DEMO_PROMPT)
    full_blocks = len(DEMO_PREFIX_TEXT.encode()) // 64  # BOS + bytes; whole blocks only
    deadline = time.monotonic() + 15
    while True:
        done = await asyncio.to_thread(_run_hint, lookup)
        assert done.returncode == 0, done.stderr
        held = {(i["site"], i["instance"]): i["usable_blocks"] for i in json.loads(done.stdout)["instances"]}
        if held.get(("dc-b", "pd-p0")) == full_blocks:
            break
        assert time.monotonic() < deadline, f"the index never showed the demo prefix: {held}"
        await asyncio.sleep(0.3)


def test_every_command_lab_up_suggests_is_one_line_that_works(lab: dict) -> None:
    """Each printed hint, pasted into bash as it stands, succeeds on this lab; the last one is its `lab down`."""
    check_hints(lab["up_stdout"], lab)


async def test_decisions_find_the_running_lab_without_nats(lab: dict) -> None:
    """`decisions tail` and `decisions summary` without --nats read the lab in $PRFAAS_LAB_DIR, as `lab status` does."""
    env = {**os.environ, "PRFAAS_LAB_DIR": lab["run_dir"]}
    tail = await asyncio.create_subprocess_exec(
        *PRFAAS, "decisions", "tail", "--count", "1", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(60):
            line = b""
            while not line:  # chat until the tail, subscribed at some point, prints a decision
                assert tail.returncode is None, (await tail.stderr.read()).decode()
                await chat(_endpoints(lab), "Hello!", max_tokens=2)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        line = await tail.stdout.readline()
        assert b" decide  " in line, line
    finally:
        if tail.returncode is None:
            tail.kill()
        await tail.wait()
    summary = await asyncio.to_thread(
        subprocess.run, [*PRFAAS, "decisions", "summary", "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["requests"] >= 1


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
    """No lab in the run dir: status and down say so and exit 2, link is refused."""
    status = _prfaas(tmp_path, "status")
    assert status.returncode == 2 and f"no lab in {tmp_path}" in status.stderr
    down = _prfaas(tmp_path, "down")
    assert down.returncode == 2 and f"no lab runs in {tmp_path}" in down.stderr
    link = _prfaas(tmp_path, "link", "dc-a", "dc-b", "--down")
    assert link.returncode == 2 and f"no lab runs in {tmp_path}" in link.stderr


def test_a_foreground_lab_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """`lab up` in the foreground: SIGTERM once ready stops every process it started and exits 0."""
    lab = subprocess.Popen(
        [*PRFAAS, "lab", "up", "--run-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
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


def test_the_demo_starts_a_lab_reports_both_routes_and_stops_it(tmp_path: Path) -> None:
    """`lab demo` with no lab running: starts the default one, sends a mix, prints the summary, leaves no process."""
    demo = subprocess.run(
        [*PRFAAS, "lab", "demo", "--requests", "8", "--json", "--run-dir", str(tmp_path), "--keep-logs"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert demo.returncode == 0, demo.stderr
    summary = json.loads(demo.stdout)
    assert (summary["requests"], summary["failed"]) == (8, 0)
    routes = summary["ttft_by_route"]
    assert sum(r["requests"] for r in routes.values()) == 8 and {"local", "remote"} <= set(routes)
    assert summary["offloaded"] == routes["remote"]["requests"] and 0 < summary["offloaded_share"] < 1
    assert summary["wan_bytes"] > 1_000_000  # at least one prompt's KV crossed the link
    assert summary["output_tokens_per_s"] > 0 and summary["cache_hits"] >= 1
    assert summary["remote_prefill_sites"] == ["dc-a"] and summary["sample"]["completion"]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "stopped"
    assert [p["name"] for p in status["processes"] if alive(p["pid"], p["start_ticks"])] == []


def test_the_case_study_lab_serves_the_demo_at_its_own_scale(tmp_path: Path) -> None:
    """The paper's deployment (simulated H200/H20): `demo --topology case-study` scales prompts to its threshold, both
    routes serve, another topology's demo is refused while it runs, and every printed hint works on it."""
    up = _prfaas(tmp_path, "up", "--topology", "case-study", "--detach", timeout=120)
    assert up.returncode == 0, up.stderr
    try:
        other = _prfaas(tmp_path, "demo", "--topology", "default")
        assert other.returncode == 2 and "a 'case-study' lab runs in" in other.stderr, other.stderr
        demo = _prfaas(
            tmp_path,
            "demo",
            "--topology",
            "case-study",
            "--requests",
            "16",
            "--concurrency",
            "4",
            "--json",
            timeout=180,
        )
        assert demo.returncode == 0, demo.stderr
        assert "prompt lengths: the case study's x 1" in demo.stderr  # its threshold is the case study's own
        summary = json.loads(demo.stdout)
        assert (summary["requests"], summary["failed"]) == (16, 0)
        assert {"local", "remote"} <= set(summary["ttft_by_route"]) and summary["wan_bytes"] > 0
        check_hints(up.stdout, json.loads((tmp_path / "status.json").read_text()))
    finally:
        down = _prfaas(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    status = json.loads((tmp_path / "status.json").read_text())
    assert [p["name"] for p in status["processes"] if alive(p["pid"], p["start_ticks"])] == []
