"""What ``prfaas lab demo`` shows: progress while it runs, then a summary table, a sample answer and what went wrong."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import TextIO

import numpy as np

_PROGRESS_LINES = 10  # into a file or a pipe: a line per tenth of the requests (a terminal gets one per request)
SAMPLE_CHARS = 160


@dataclass
class Result:
    """One demo request as the client saw it (the route from the router's outcome event)."""

    route: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    ok: bool
    text: str


class Progress:
    """Callable with each finished request: a line per request on a terminal, a tenth at a time elsewhere."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream, self.done = total, stream, 0
        self.every = 1 if stream.isatty() else math.ceil(total / _PROGRESS_LINES)

    def __call__(self, result: Result) -> None:
        """Count ``result``; print its line when it ends a step, is the last, or failed."""
        self.done += 1
        if result.ok and self.done % self.every and self.done != self.total:
            return
        print(
            f"[{self.done:>3}/{self.total}] {result.route:<8} {result.prompt_tokens:>6,} prompt tokens  cached "
            f"{result.cached_tokens:>6,}  TTFT {result.ttft_s:6.3f} s" + ("" if result.ok else "  FAILED"),
            file=self.stream,
            flush=True,
        )


def sample_line(text: str, limit_chars: int = SAMPLE_CHARS) -> str:
    """``text`` on one printable line (whitespace runs as one space), cut at a word past ``limit_chars``."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    if not flat:
        return "(no text)"
    if len(flat) <= limit_chars:
        return flat
    cut = flat.rfind(" ", limit_chars // 2, limit_chars + 1)
    kept = flat[: cut if cut > 0 else limit_chars]
    return f"{kept} … (+{len(flat) - len(kept):,} more characters)"


def summarize(
    results: list[Result],
    wall_s: float,
    wan_bytes: dict[str, int],
    *,
    threshold_tokens: int,
    remote_prefill_sites: list[str],
) -> dict:
    """The demo's figures; ``over_threshold`` counts answered prompts whose uncached part exceeds t."""
    ok = [r for r in results if r.ok]
    by_route: dict[str, dict] = {}
    for route in sorted({r.route for r in ok}):
        ttfts = sorted(r.ttft_s for r in ok if r.route == route)
        by_route[route] = {
            "requests": len(ttfts),
            "ttft_p50_s": statistics.median(ttfts),
            "ttft_p90_s": float(np.percentile(ttfts, 90)),
        }
    sample = next((r for r in ok if r.text), None)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "offloaded": sum(r.route == "remote" for r in ok),
        "offloaded_share": sum(r.route == "remote" for r in ok) / len(ok) if ok else 0.0,
        "fallbacks": sum(r.route == "fallback" for r in ok),
        "threshold_tokens": threshold_tokens,
        "over_threshold": sum(r.prompt_tokens - r.cached_tokens > threshold_tokens for r in ok),
        "remote_prefill_sites": remote_prefill_sites,
        "cache_hits": sum(r.cached_tokens > 0 for r in ok),
        "cached_tokens": sum(r.cached_tokens for r in ok),
        "ttft_by_route": by_route,
        "wan_bytes": sum(wan_bytes.values()),
        "wan_bytes_by_direction": wan_bytes,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "completion_tokens": sum(r.completion_tokens for r in ok),
        "wall_s": wall_s,
        "output_tokens_per_s": sum(r.completion_tokens for r in ok) / wall_s,
        "prompt_tokens_per_s": sum(r.prompt_tokens for r in ok) / wall_s,
        "sample": {"route": sample.route, "prompt_tokens": sample.prompt_tokens, "completion": sample.text}
        if sample
        else None,
    }


def problems(s: dict) -> list[str]:
    """Why the demo did not show what it is for: failed requests, or a lab built to offload that offloaded nothing."""
    found = [f"{s['failed']} of {s['requests']} requests failed"] if s["failed"] else []
    if s["remote_prefill_sites"] and s["over_threshold"] and not s["offloaded"]:
        found.append(
            f"nothing was offloaded, although {s['over_threshold']} prompts were longer than the threshold "
            f"t = {s['threshold_tokens']:,} tokens and {', '.join(s['remote_prefill_sites'])} serve remote "
            "prefill (`prfaas decisions summary` and the router's log tell why)"
        )
    return found


def table(s: dict) -> str:
    """The summary as a small table, then the sample answer."""
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
    if s["sample"]:
        sample = s["sample"]
        lines.append(
            f"sample answer     ({sample['route']}, {sample['prompt_tokens']:,} prompt tokens): "
            f"{sample_line(sample['completion'])}"
        )
    return "\n".join(lines)
