"""``prfaas lab demo``: short and long prompts through a lab's router, live progress, then a summary and a sample.

Prompt lengths follow the paper's case-study workload (log-normal, median ~19.9K tokens) scaled by
``--length-scale``; by default by the lab's offload threshold over the case study's (1/16 for the
default topology, 1 for ``case-study``), so about half of the prompts go remote, as in the paper.
A quarter of the requests ask again about an earlier document, so prefix caches get hits. Starts
a lab (``--topology``, else the default one) if none runs in the run directory, and stops what it
started. Exits 1 when a request failed, or when a lab with a remote prefill site offloaded none of
the prompts longer than its threshold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import time

import msgspec
import nats
import numpy as np
import openai

from libs.common import subjects
from libs.common.errors import BadRequest, ConfigError, UpstreamTimeout
from libs.lab.demo_report import Progress, Result, problems, summarize, table
from libs.lab.runstate import router_site, running_status, stop_lab
from libs.lab.topology import load_topology
from libs.lab.up import DEMO_PROMPT, start_detached
from libs.lab.wan_server import link_figures
from libs.planner.workloads import CASE_STUDY_WORKLOAD

_WORDS = (
    "prefill",
    "decode",
    "cache",
    "link",
    "layer",
    "token",
    "block",
    "state",
    "site",
    "router",
    "budget",
    "queue",
    "latency",
    "hybrid",
    "attention",
    "linear",
    "transfer",
    "manifest",
    "chunk",
    "lease",
)
_REUSE_SHARE = 0.25
CASE_STUDY_THRESHOLD_TOKENS = 19_392  # the threshold t `prfaas plan --case-study` derives
_OUTCOME_TIMEOUT_S = 10.0


def run_demo(args: argparse.Namespace) -> int:
    """Use the running lab (or start one), drive the traffic, print the table, stop what it started; 1 on a problem."""
    bad_scale = args.length_scale is not None and args.length_scale <= 0
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1 or bad_scale:
        raise BadRequest("--requests, --concurrency and --max-tokens must be >= 1 and --length-scale > 0")
    status = running_status(args.run_dir)
    if status is not None and args.topology is not None and load_topology(args.topology).name != status["topology"]:
        raise ConfigError(
            f"a {status['topology']!r} lab runs in {args.run_dir}: stop it with `prfaas lab down` to "
            f"run the demo on {args.topology!r}, or leave out --topology"
        )
    started_here = status is None
    if started_here:
        topology = args.topology or "default"
        load_topology(topology)  # a wrong name or file is refused before anything starts
        print(f"no lab runs in {args.run_dir}: starting the {topology!r} topology ...", file=sys.stderr, flush=True)
        status = start_detached(args.run_dir, topology, log_level="INFO", ready_timeout_s=60.0)
        print(f"lab up: router {status['router_url']}", file=sys.stderr, flush=True)
    summary = None
    try:
        summary = asyncio.run(_drive(status, args))
    finally:
        if started_here:
            stop_lab(args.run_dir)
            if summary is not None and not problems(summary) and not args.keep_logs:
                shutil.rmtree(args.run_dir, ignore_errors=True)
                print("stopped the lab the demo started and removed its run directory", file=sys.stderr, flush=True)
            else:
                print(
                    f"stopped the lab the demo started (logs kept in {args.run_dir / 'logs'})",
                    file=sys.stderr,
                    flush=True,
                )
    print(json.dumps(summary, indent=2) if args.json else table(summary), flush=True)
    for problem in problems(summary):
        print(f"prfaas lab demo: {problem}", file=sys.stderr, flush=True)
    return 1 if problems(summary) else 0


def length_scale(status: dict) -> float:
    """The lab's offload threshold over the case study's: prompts then go remote about as often as in the paper."""
    return status.get("threshold_tokens", CASE_STUDY_THRESHOLD_TOKENS / 16) / CASE_STUDY_THRESHOLD_TOKENS


def prompts(n: int, scale: float, seed: int, max_tokens: int) -> list[tuple[int, str]]:
    """``n`` user messages (document, question) with case-study lengths times ``scale``; some reuse a document."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(CASE_STUDY_WORKLOAD.sample(rng, n) * scale), 16, max_tokens).astype(int)
    documents: list[str] = []
    out = []
    for i, length in enumerate(lengths):
        if documents and rng.random() < _REUSE_SHARE:
            doc = int(rng.integers(len(documents)))
        else:
            words = rng.choice(_WORDS, size=int(length) // 6 + 1)
            documents.append(f"Document {len(documents)}: " + " ".join(words))
            doc = len(documents) - 1
        text = documents[doc][: int(length)]
        out.append((doc, f"{text}\n\nQuestion {i}: what does the document above say about the link?"))
    return out


async def _drive(status: dict, args: argparse.Namespace) -> dict:
    site = router_site(status)
    scale = length_scale(status) if args.length_scale is None else args.length_scale
    print(f"prompt lengths: the case study's x {scale:.4g}", file=sys.stderr, flush=True)
    messages = prompts(args.requests, scale, args.seed, max_tokens=_max_prompt(status))
    wan_before = _wan_bytes(status)
    nc = await nats.connect(status["sites"][site]["nats_url"], connect_timeout=5)
    outcomes: dict[str, dict] = {}
    arrived: dict[str, asyncio.Event] = {}

    async def on_outcome(msg) -> None:
        event = msgspec.json.decode(msg.data)
        outcomes[event["request_id"]] = event
        arrived.setdefault(event["request_id"], asyncio.Event()).set()

    await nc.subscribe(subjects.outcomes(site), cb=on_outcome)
    client = openai.AsyncOpenAI(
        base_url=status["router_url"] + "/v1", api_key=status["api_key"] or "unused", max_retries=0, timeout=120
    )
    slots = asyncio.Semaphore(args.concurrency)
    results: list[Result] = []
    progress = Progress(args.requests, sys.stdout)
    started = time.monotonic()

    async def one(i: int, text: str) -> None:
        async with slots:
            result = await _request(client, status["model"], text, args.max_tokens, outcomes, arrived)
        results.append(result)
        if not args.json:
            progress(result)

    try:
        async with client:
            await asyncio.gather(*(one(i, text) for i, (_, text) in enumerate(messages)))
    finally:
        await nc.close()
    wall_s = time.monotonic() - started
    wan_after = _wan_bytes(status)
    remote_sites = sorted({p["site"] for p in status["processes"] if p["role"] == "prefill_gateway"} - {site})
    return summarize(
        results,
        wall_s,
        {k: wan_after[k] - wan_before.get(k, 0) for k in wan_after},
        threshold_tokens=status["threshold_tokens"],
        remote_prefill_sites=remote_sites,
    )


async def _request(client, model: str, text: str, max_tokens: int, outcomes: dict, arrived: dict) -> Result:
    start = time.monotonic()
    first: float | None = None
    usage = None
    request_id = ""
    answer: list[str] = []
    try:
        stream = await client.chat.completions.create(
            model=model,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "system", "content": DEMO_PROMPT}, {"role": "user", "content": text}],
        )
        async for chunk in stream:
            request_id = chunk.id.removeprefix("chatcmpl-")
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic()
                answer.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.APIError as e:
        print(f"request failed: {e}", file=sys.stderr)
        return Result("error", 0, 0, 0, time.monotonic() - start, False, "")
    event = arrived.setdefault(request_id, asyncio.Event())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), _OUTCOME_TIMEOUT_S)
    route = outcomes.get(request_id, {}).get("route", "unknown")
    details = usage.prompt_tokens_details if usage else None
    return Result(
        route,
        usage.prompt_tokens if usage else 0,
        (details.cached_tokens or 0) if details else 0,
        usage.completion_tokens if usage else 0,
        (first or time.monotonic()) - start,
        usage is not None,
        "".join(answer),
    )


def _max_prompt(status: dict) -> int:
    """Longest prompt to send: the reference model's context leaves room for the template and the answer."""
    return 8192 if status["model"] == "reference" else 131_072


def _wan_bytes(status: dict) -> dict[str, int]:
    out = {}
    for link in status["links"]:
        try:
            for d in link_figures(link["control_url"])["directions"]:
                out[f"{d['src']}->{d['dst']}"] = d["bytes"]
        except UpstreamTimeout:
            pass
    return out
