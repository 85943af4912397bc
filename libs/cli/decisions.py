"""``prfaas decisions tail|summary``: the routers' decision and outcome events, live or replayed from PRFAAS_DECISIONS."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from pathlib import Path

import msgspec
import nats.errors
from nats.js import api

from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.errors import BadRequest
from libs.common.messages import DecisionEvent, OutcomeEvent, ThresholdChanged, analytics_event_decoder
from libs.lab.runstate import default_run_dir, router_nats_url

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration_s(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``1d`` in seconds (BadRequest otherwise)."""
    found = _DURATION.match(text.strip())
    if not found or float(found.group(1)) <= 0:
        raise BadRequest(f"--since {text!r}: expected a positive duration such as 90s, 10m, 2h or 1d")
    return float(found.group(1)) * _UNIT_S[found.group(2)]


def add_parser(subparsers) -> None:
    """Register ``decisions tail`` and ``decisions summary``."""
    parser = subparsers.add_parser(
        "decisions",
        description="The routers' decision and outcome events, live or replayed "
        "from PRFAAS_DECISIONS (at a running lab's router site unless --nats names one).",
    )
    sub = parser.add_subparsers(dest="decisions_command", required=True, metavar="ACTION")
    tail = sub.add_parser("tail", help="print decisions and outcomes as they happen, one line each")
    _add_lab_arguments(tail)
    tail.add_argument("--site", default="*", help="only this router site (default: every site)")
    tail.add_argument("--count", type=int, default=0, help="stop after this many events (0: until Ctrl-C)")
    tail.set_defaults(func=run_tail)
    summary = sub.add_parser(
        "summary", help="replay the stream: offload and cache-hit shares, TTFT by route, link bytes"
    )
    _add_lab_arguments(summary)
    summary.add_argument("--since", default="10m", help="how far back to replay (90s, 10m, 2h, 1d; default 10m)")
    summary.add_argument("--site", default="", help="only this router site")
    summary.add_argument("--json", action="store_true", help="print one JSON object")
    summary.add_argument("--timeout-s", type=float, default=5.0, help="deadline for reaching NATS and replaying")
    summary.set_defaults(func=run_summary)


def _add_lab_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", help="NATS URL (default: the router site's of the lab running in --run-dir)")
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=default_run_dir(),
        help="a running lab's run directory (default: $PRFAAS_LAB_DIR or %(default)s)",
    )


def line(event) -> str:
    """One readable line for an event."""
    stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
    if isinstance(event, DecisionEvent):
        d = event.decision
        cached = ",".join(f"{s}={n}" for s, n in sorted(event.cached_tokens.items())) or "none"
        head = (
            f"{stamp} decide  {event.request_id[:12]} {event.route:<8} prefill {d.prefill_site}/{d.prefill_instance} "
            f"decode {d.decode_instance} prompt={event.prompt_tokens} uncached={event.incremental_tokens} "
            f"cached[{cached}] t={event.threshold_tokens} pred_ttft={d.predicted_ttft_s * 1000:.0f}ms"
        )
        if event.index != "ok":
            head += f" index={event.index}"
        return f"{head} | {d.reason}"  # a fallback's reason starts with what failed
    if isinstance(event, OutcomeEvent):
        ttft = f"{event.ttft_s * 1000:.0f}ms" if event.ttft_s is not None else "-"
        tpot = f"{event.tpot_s * 1000:.1f}ms" if event.tpot_s is not None else "-"
        pred = f"{event.predicted_ttft_s * 1000:.0f}ms" if event.predicted_ttft_s is not None else "-"
        tail = f" {event.error}" if event.error else ""
        return (
            f"{stamp} outcome {event.request_id[:12]} {event.route:<8} {event.status} ttft={ttft} (pred {pred}) "
            f"tpot={tpot} tokens={event.prompt_tokens}+{event.completion_tokens} bytes={event.bytes_moved} "
            f"attempts={event.attempts}{tail}"
        )
    return (
        f"{stamp} plan    t {event.old_threshold_tokens} -> {event.threshold_tokens} link={event.link_gbps:.2f}Gbps "
        f"from {event.observed_requests} requests (N_p {event.n_p} -> proposed {event.proposed_n_p})"
    )


async def _tail(args: argparse.Namespace) -> int:
    nc = await connect(args.nats, name="prfaas-decisions-tail")
    site = args.site
    done = asyncio.Event()
    seen = 0

    async def show(msg) -> None:
        nonlocal seen
        try:
            print(line(analytics_event_decoder.decode(msg.data)), flush=True)
        except msgspec.DecodeError:
            return
        seen += 1
        if args.count and seen >= args.count:
            done.set()

    try:
        for subject in (
            f"{subjects.PREFIX}.decisions.{site}",
            f"{subjects.PREFIX}.outcomes.{site}",
            f"{subjects.PREFIX}.plans.{site}",
        ):
            await nc.subscribe(subject, cb=show)
        await settle(nc)
        await done.wait()
    finally:
        await nc.drain()
    return 0


def run_tail(args: argparse.Namespace) -> int:
    """``prfaas decisions tail``."""
    if args.site != "*":
        subjects.token(args.site, "site")
    args.nats = args.nats or router_nats_url(args.run_dir)
    return asyncio.run(_tail(args))


async def replay(nats_url: str, since_s: float, timeout_s: float) -> tuple[list, int]:
    """Every event of the stream newer than ``since_s`` seconds, in stream order, and how many were skipped.

    An event of an older schema (``route.decision_event.v1``, before the fields it repeated were dropped)
    or an undecodable one is skipped and counted, not guessed at.
    """
    nc = await connect(nats_url, name="prfaas-decisions-summary", connect_timeout_s=timeout_s)
    events, skipped = [], 0
    try:
        js = nc.jetstream()
        start = time.time() - since_s
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_TIME,
            opt_start_time=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)) + "Z",
        )
        try:
            info = await js.stream_info(subjects.DECISIONS_STREAM)
        except nats.errors.Error as e:
            raise BadRequest(f"stream {subjects.DECISIONS_STREAM} not found at {nats_url} ({e})") from None
        if info.state.messages == 0:
            return [], 0
        sub = await js.subscribe(
            f"{subjects.PREFIX}.>", stream=subjects.DECISIONS_STREAM, ordered_consumer=True, config=config
        )
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                msg = await sub.next_msg(timeout=min(0.5, max(0.01, end - time.monotonic())))
            except nats.errors.TimeoutError:
                break
            try:
                events.append(analytics_event_decoder.decode(msg.data))
            except msgspec.DecodeError:
                skipped += 1
            if msg.metadata.num_pending == 0:
                break
        await sub.unsubscribe()
    finally:
        await nc.drain()
    return events, skipped


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "count": len(values),
        "p50_s": pick(0.5),
        "p90_s": pick(0.9),
        "p99_s": pick(0.99),
        "mean_s": statistics.fmean(values),
    }


def summarize(events: list, site: str = "", skipped: int = 0) -> dict:
    """Offload and cache-hit shares, TTFT percentiles by route, link bytes, prediction error.

    A request counts as offloaded by where its prefill ran, as its outcome says: at another site, with
    KV bytes sent from there. One decided remote whose prefill ran at the router's site fell back to local.
    """
    decisions = [e for e in events if isinstance(e, DecisionEvent) and (not site or e.site == site)]
    outcomes = [e for e in events if isinstance(e, OutcomeEvent) and (not site or e.site == site)]
    plans = [e for e in events if isinstance(e, ThresholdChanged) and (not site or e.site == site)]
    first = [d for d in decisions if d.attempt == 0]
    n = len(first)
    ran = {o.request_id: o for o in outcomes}
    decided_remote = [d.request_id for d in first if d.route == "remote"]
    offloaded = sum(1 for d in first if d.request_id in ran and _prefilled_remotely(ran[d.request_id]))
    fell_back = sum(1 for r in decided_remote if r in ran and ran[r].prefill_site == ran[r].site)
    hits = sum(1 for d in first if any(v > 0 for v in d.cached_tokens.values()))
    by_route: dict[str, list[float]] = {}
    for o in outcomes:
        if o.status == "ok" and o.ttft_s is not None:
            by_route.setdefault(o.route, []).append(o.ttft_s)
    errors = [
        o.ttft_s - o.predicted_ttft_s for o in outcomes if o.ttft_s is not None and o.predicted_ttft_s is not None
    ]
    link_bytes = sum(o.bytes_moved for o in outcomes if o.prefill_site and o.prefill_site != o.site)
    return {
        "requests": n,
        "offload_share": offloaded / n if n else None,
        "decided_remote_share": len(decided_remote) / n if n else None,
        "fell_back_to_local": fell_back,
        "cache_hit_share": hits / n if n else None,
        "fallbacks": sum(1 for d in decisions if d.route == "fallback"),
        "index_unavailable": sum(1 for d in first if d.index.startswith("unavailable")),
        "index_not_asked": sum(1 for d in first if d.index.startswith("not asked")),
        "outcomes": {
            status: sum(1 for o in outcomes if o.status == status) for status in sorted({o.status for o in outcomes})
        },
        "ttft_by_route": {route: _percentiles(v) for route, v in sorted(by_route.items())},
        "link_bytes": link_bytes,
        "prediction_error": {
            "count": len(errors),
            "median_s": statistics.median(errors) if errors else None,
            "mean_abs_s": statistics.fmean(abs(e) for e in errors) if errors else None,
        },
        "thresholds": [{"ts": p.ts, "from": p.old_threshold_tokens, "to": p.threshold_tokens} for p in plans],
        "skipped_events": skipped,  # of an older schema (or undecodable): not counted above
    }


def _prefilled_remotely(outcome: OutcomeEvent) -> bool:
    """The request's prefill ran at another site than its router's and its KV crossed."""
    return outcome.prefill_site not in ("", outcome.site) and outcome.bytes_moved > 0


def _text(summary: dict, since: str) -> str:
    def share(x):
        return "-" if x is None else f"{x:.1%}"

    rows = [
        f"last {since}: {summary['requests']} requests, offload {share(summary['offload_share'])} "
        f"(decided {share(summary['decided_remote_share'])}, fell back to local {summary['fell_back_to_local']}), "
        f"cache hits {share(summary['cache_hit_share'])}, fallbacks {summary['fallbacks']}, "
        f"index unavailable {summary['index_unavailable']}, not asked {summary['index_not_asked']}",
        f"outcomes: {', '.join(f'{k} {v}' for k, v in summary['outcomes'].items()) or 'none'}; "
        f"link bytes {summary['link_bytes']:,}",
    ]
    for route, p in summary["ttft_by_route"].items():
        rows.append(
            f"TTFT {route:<8} n={p['count']:<5} p50 {p['p50_s'] * 1000:.0f} ms  p90 {p['p90_s'] * 1000:.0f} ms  "
            f"p99 {p['p99_s'] * 1000:.0f} ms"
        )
    err = summary["prediction_error"]
    if err["count"]:
        rows.append(
            f"TTFT prediction error (observed - predicted): median {err['median_s'] * 1000:+.0f} ms, "
            f"mean |error| {err['mean_abs_s'] * 1000:.0f} ms over {err['count']}"
        )
    for t in summary["thresholds"]:
        rows.append(f"threshold re-planned {t['from']} -> {t['to']}")
    if summary["skipped_events"]:
        rows.append(
            f"{summary['skipped_events']} events of an older schema skipped (this prfaas reads decision events v2)"
        )
    return "\n".join(rows)


def run_summary(args: argparse.Namespace) -> int:
    """``prfaas decisions summary``."""
    since_s = parse_duration_s(args.since)
    if args.timeout_s <= 0:
        raise BadRequest(f"--timeout-s must be positive, got {args.timeout_s}")
    events, skipped = asyncio.run(replay(args.nats or router_nats_url(args.run_dir), since_s, args.timeout_s))
    summary = summarize(events, args.site, skipped)
    print(json.dumps(summary, indent=2) if args.json else _text(summary, args.since))
    return 0
