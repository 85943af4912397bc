"""``prfaas lab demo``: short and long prompts through a lab's router, live progress, then a summary table.

Prompt lengths follow the paper's case-study workload (log-normal, median ~19.9K tokens) scaled by
``--length-scale``; by default by the lab's offload threshold over the case study's (1/16 for the
default topology, 1 for ``case-study``), so about half of the prompts go remote, as in the paper.
A quarter of the requests ask again about an earlier document, so prefix caches get hits. Starts
the default lab if none runs in the run directory, and stops what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass

import msgspec
import nats
import numpy as np
import openai

from libs.common import subjects
from libs.common.errors import BadRequest, UpstreamTimeout
from libs.lab.runstate import running_status, stop_lab
from libs.lab.up import DEMO_PROMPT, start_detached
from libs.lab.wan_server import link_figures
from libs.planner.workloads import CASE_STUDY_WORKLOAD

_WORDS = ("prefill", "decode", "cache", "link", "layer", "token", "block", "state", "site", "router", "budget",
          "queue", "latency", "hybrid", "attention", "linear", "transfer", "manifest", "chunk", "lease")  # fmt: skip
_REUSE_SHARE = 0.25
CASE_STUDY_THRESHOLD_TOKENS = 19_392  # the threshold t `prfaas plan --case-study` derives
_OUTCOME_TIMEOUT_S = 10.0


@dataclass
class _Result:
    route: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    ok: bool


def run_demo(args: argparse.Namespace) -> int:
    """Use the running lab (or start the default one), drive the traffic, print the table, stop what it started."""
    bad_scale = args.length_scale is not None and args.length_scale <= 0
    if args.requests < 1 or args.concurrency < 1 or args.max_tokens < 1 or bad_scale:
        raise BadRequest("--requests, --concurrency and --max-tokens must be >= 1 and --length-scale > 0")
    status = running_status(args.run_dir)
    started_here = status is None
    if started_here:
        print(f"no lab runs in {args.run_dir}: starting the default one ...", file=sys.stderr, flush=True)
        status = start_detached(args.run_dir, "default", log_level="INFO", ready_timeout_s=60.0)
        print(f"lab up: router {status['router_url']}", file=sys.stderr, flush=True)
    summary = None
    try:
        summary = asyncio.run(_drive(status, args))
    finally:
        if started_here:
            stop_lab(args.run_dir)
            if summary is not None and summary["failed"] == 0 and not args.keep_logs:
                shutil.rmtree(args.run_dir, ignore_errors=True)
                print("stopped the lab the demo started and removed its run directory", file=sys.stderr, flush=True)
            else:
                print(f"stopped the lab the demo started (logs kept in {args.run_dir / 'logs'})", file=sys.stderr,
                      flush=True)  # fmt: skip
    print(json.dumps(summary, indent=2) if args.json else table(summary), flush=True)
    return 0 if summary["failed"] == 0 else 1


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
    router_site = next(site for site, url in status["routers"].items() if url == status["router_url"])
    scale = length_scale(status) if args.length_scale is None else args.length_scale
    print(f"prompt lengths: the case study's x {scale:.4g}", file=sys.stderr, flush=True)
    messages = prompts(args.requests, scale, args.seed, max_tokens=_max_prompt(status))
    wan_before = _wan_bytes(status)
    nc = await nats.connect(status["sites"][router_site]["nats_url"], connect_timeout=5)
    outcomes: dict[str, dict] = {}
    arrived: dict[str, asyncio.Event] = {}

    async def on_outcome(msg) -> None:
        event = msgspec.json.decode(msg.data)
        outcomes[event["request_id"]] = event
        arrived.setdefault(event["request_id"], asyncio.Event()).set()

    await nc.subscribe(subjects.outcomes(router_site), cb=on_outcome)
    client = openai.AsyncOpenAI(base_url=status["router_url"] + "/v1", api_key=status["api_key"] or "unused",
                                max_retries=0, timeout=120)  # fmt: skip
    slots = asyncio.Semaphore(args.concurrency)
    results: list[_Result] = []
    started = time.monotonic()

    async def one(i: int, text: str) -> None:
        async with slots:
            result = await _request(client, status["model"], text, args.max_tokens, outcomes, arrived)
        results.append(result)
        if not args.json:
            print(f"[{len(results):>3}/{args.requests}] {result.route:<8} {result.prompt_tokens:>6,} prompt tokens"
                  f"  cached {result.cached_tokens:>6,}  TTFT {result.ttft_s:6.3f} s" + ("" if result.ok else "  FAILED"),
                  flush=True)  # fmt: skip

    try:
        async with client:
            await asyncio.gather(*(one(i, text) for i, (_, text) in enumerate(messages)))
    finally:
        await nc.close()
    wall_s = time.monotonic() - started
    return _summary(results, wall_s, wan_before, _wan_bytes(status))


async def _request(client, model: str, text: str, max_tokens: int, outcomes: dict, arrived: dict) -> _Result:
    start = time.monotonic()
    first: float | None = None
    usage = None
    request_id = ""
    try:
        stream = await client.chat.completions.create(
            model=model, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": DEMO_PROMPT}, {"role": "user", "content": text}],
        )  # fmt: skip
        async for chunk in stream:
            request_id = chunk.id.removeprefix("chatcmpl-")
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.monotonic()
            if chunk.usage is not None:
                usage = chunk.usage
    except openai.APIError as e:
        print(f"request failed: {e}", file=sys.stderr)
        return _Result("error", 0, 0, 0, time.monotonic() - start, False)
    event = arrived.setdefault(request_id, asyncio.Event())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), _OUTCOME_TIMEOUT_S)
    route = outcomes.get(request_id, {}).get("route", "unknown")
    details = usage.prompt_tokens_details if usage else None
    return _Result(route, usage.prompt_tokens if usage else 0, (details.cached_tokens or 0) if details else 0,
                   usage.completion_tokens if usage else 0, (first or time.monotonic()) - start, usage is not None)  # fmt: skip


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


def _summary(results: list[_Result], wall_s: float, wan_before: dict[str, int], wan_after: dict[str, int]) -> dict:
    ok = [r for r in results if r.ok]
    by_route: dict[str, dict] = {}
    for route in sorted({r.route for r in ok}):
        ttfts = sorted(r.ttft_s for r in ok if r.route == route)
        by_route[route] = {"requests": len(ttfts), "ttft_p50_s": statistics.median(ttfts),
                           "ttft_p90_s": float(np.percentile(ttfts, 90))}  # fmt: skip
    wan = {k: wan_after.get(k, 0) - wan_before.get(k, 0) for k in wan_after}
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "offloaded": sum(r.route == "remote" for r in ok),
        "offloaded_share": sum(r.route == "remote" for r in ok) / len(ok) if ok else 0.0,
        "fallbacks": sum(r.route == "fallback" for r in ok),
        "cache_hits": sum(r.cached_tokens > 0 for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "ttft_by_route": by_route,
        "wan_bytes": sum(wan.values()),
        "wan_bytes_by_direction": wan,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "completion_tokens": sum(r.completion_tokens for r in ok),
        "wall_s": wall_s,
        "output_tokens_per_s": sum(r.completion_tokens for r in ok) / wall_s,
        "prompt_tokens_per_s": sum(r.prompt_tokens for r in ok) / wall_s,
    }


def table(s: dict) -> str:
    """The summary as a small table."""
    lines = [
        "",
        f"requests          {s['requests']} ({s['failed']} failed)",
        f"offloaded         {s['offloaded']} = {s['offloaded_share']:.0%} prefilled remotely"
        + (f"; {s['fallbacks']} fell back to local prefill" if s["fallbacks"] else ""),
        f"cache hits        {s['cache_hits']} requests, {s['cached_tokens']:,} prompt tokens not recomputed",
        f"TTFT by route     {'requests':>8}  {'p50':>8}  {'p90':>8}",
    ]
    for route, r in s["ttft_by_route"].items():
        lines.append(f"  {route:<15} {r['requests']:>8}  {r['ttft_p50_s']:>6.3f} s  {r['ttft_p90_s']:>6.3f} s")
    directions = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in s["wan_bytes_by_direction"].items())
    lines += [
        f"bytes over WAN    {s['wan_bytes'] / 1e6:.1f} MB ({directions})",
        f"tokens/s          {s['output_tokens_per_s']:.1f} output, {s['prompt_tokens_per_s']:,.0f} prompt "
        f"({s['wall_s']:.1f} s wall)",
    ]
    return "\n".join(lines)

