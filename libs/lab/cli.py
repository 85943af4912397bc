"""``prfaas lab up|status|down|demo|link|case-study|compose``: run a multi-site lab natively, drive it, change its links, render compose.

The verbs' flags are all defined here; ``up``, ``demo`` and ``compose`` import their modules (the supervisor,
the OpenAI client, the topology models) only when they run, so ``status``, ``down`` and ``link`` start quickly.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from libs.bench.case_study_args import add_lab_arguments as add_case_study_arguments
from libs.common.errors import BadRequest, NotFound, UpstreamTimeout
from libs.lab.runstate import alive, default_run_dir, read_status, running_status, stop_lab
from libs.lab.wan_server import change_link, link_figures


def add_parser(subparsers) -> None:
    """Register ``lab`` and its verbs."""
    lab = subparsers.add_parser(
        "lab",
        description="Run a multi-site lab on this machine (NATS, Redis, services, WAN "
        "links), drive it, change its links, render it as a docker compose project.",
    )
    verbs = lab.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help: str, func) -> argparse.ArgumentParser:  # noqa: A002 (argparse's word)
        p = verbs.add_parser(name, help=help, description=help)
        p.add_argument(
            "--run-dir",
            type=Path,
            default=default_run_dir(),
            help="the lab's run directory: status, logs, configs (default: $PRFAAS_LAB_DIR or %(default)s)",
        )
        p.set_defaults(func=func)
        return p

    up = verb(
        "up",
        "start every process of a topology, wait until all serve, print the endpoints",
        _when_run("libs.lab.up", "run_up"),
    )
    up.add_argument(
        "--topology", default="default", help="a shipped topology name or a .toml file (default %(default)s)"
    )
    up.add_argument("--detach", action="store_true", help="return once ready; `prfaas lab down` stops the lab")
    up.add_argument("--ready-timeout-s", type=_positive, default=60.0, help="readiness deadline (default %(default)s)")
    up.add_argument("--duration-s", type=_positive, help="stop after this many seconds (default: until Ctrl-C/SIGTERM)")
    up.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="services' log level (their logs are in the run directory; default %(default)s)",
    )

    status = verb(
        "status",
        "each process's state, the lab's endpoints, and each link direction's live goodput, use and connections",
        run_status,
    )
    status.add_argument("--json", action="store_true", help="one JSON object")

    verb("down", "stop a detached lab (no process is left)", run_down)

    demo = verb(
        "demo",
        "short and long prompts through the router, live progress, a sample answer, a summary "
        "table (starts a lab if none runs, and stops what it started); exit 1 if a request failed or a lab "
        "with a remote prefill site offloaded nothing",
        _when_run("libs.lab.demo", "run_demo"),
    )
    demo.add_argument(
        "--topology",
        help="the lab to start when none runs: a shipped topology name or a .toml file "
        "(default: default); a running lab of another topology is refused",
    )
    demo.add_argument("--requests", type=int, default=24, help="how many requests (default %(default)s)")
    demo.add_argument("--concurrency", type=int, default=3, help="requests in flight at once (default %(default)s)")
    demo.add_argument(
        "--length-scale",
        type=float,
        default=None,
        help="factor on the case-study prompt lengths (default: the lab's threshold over the case "
        "study's, 1/16 for the default topology, 1 for case-study)",
    )
    demo.add_argument("--max-tokens", type=int, default=32, help="completion tokens per request (default %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="prompt lengths and documents (default %(default)s)")
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the run directory of a lab the demo started (kept anyway when a request fails)",
    )

    link = verb("link", "change a running lab's WAN link between two sites", run_link)
    link.add_argument("src", help="a site")
    link.add_argument("dst", help="the other site")
    link.add_argument("--gbps", type=_positive, help="bandwidth per direction")
    link.add_argument("--rtt-ms", type=_non_negative, help="round-trip time")
    link.add_argument("--loss-pct", type=_non_negative, help="segment loss in percent")
    state = link.add_mutually_exclusive_group()
    state.add_argument("--down", action="store_true", help="partition the link (blackhole: connections hang)")
    state.add_argument("--up", action="store_true", help="restore a partitioned link")
    link.add_argument("--reset", action="store_true", help="with --down: end connections at once and refuse new ones")
    link.add_argument(
        "--one-way", action="store_true", help="change only the SRC -> DST direction (bandwidth, delay, loss)"
    )
    restart = link.add_mutually_exclusive_group()
    restart.add_argument(
        "--no-slow-start-after-idle",
        dest="slow_start_after_idle",
        action="store_false",
        default=None,
        help="keep a connection's window across idle periods (a host with tcp_slow_start_after_idle=0)",
    )
    restart.add_argument(
        "--slow-start-after-idle",
        dest="slow_start_after_idle",
        action="store_true",
        help="restart from 10 segments after an idle RTO (Linux's default)",
    )

    case = verbs.add_parser(
        "case-study",
        help="the paper's case study on the lab: each planned deployment's throughput and TTFT (`prfaas bench "
        "case-study`)",
        description=(
            "Start the case study's three deployments one after another (simulated chips, scaled in time and "
            "bytes), drive each through the router, find its sustainable throughput and TTFT; print them beside "
            "the planner's, the simulator's and the paper's; exit 1 when a target is missed."
        ),
    )
    add_case_study_arguments(case)
    case.set_defaults(func=_when_run("libs.bench.case_study_args", "run_from_lab"))

    compose = verbs.add_parser(
        "compose", help="render a topology as a docker compose project (compose file, NATS configs)"
    )
    compose.add_argument(
        "--topology", default="default", help="a shipped topology name or a .toml file (default %(default)s)"
    )
    compose.add_argument("--out", type=Path, required=True, help="directory to write into (e.g. compose/)")
    compose.add_argument(
        "--nats-users",
        action="store_true",
        help="NATS users per role as in `lab up`: each password from $PRFAAS_NATS_<USER>_PASSWORD, which compose requires",
    )
    compose.set_defaults(func=run_compose)


def _when_run(module: str, function: str):
    """A verb's ``func`` that imports ``module`` only when the verb runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def _positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def run_status(args: argparse.Namespace) -> int:
    """Print each process (alive or not) and the endpoints; exit 1 when no lab runs in the run directory."""
    status = read_status(args.run_dir)
    running = running_status(args.run_dir) is not None
    for p in status["processes"]:
        p["alive"] = p["pid"] is not None and alive(p["pid"], p["start_ticks"])
    if status["state"] in ("starting", "ready") and not running:
        status["state"] = "dead"  # the supervisor is gone without writing its end
    for link in status["links"]:
        try:
            link["live"] = link_figures(link["control_url"], timeout_s=1.0) if running else None
        except (UpstreamTimeout, BadRequest):
            link["live"] = None
    if args.json:
        print(json.dumps(status, indent=2))
        return 0 if running else 1
    print(f"lab {status['topology']!r}: {status['state']}   run dir {status['run_dir']}")
    if status.get("error"):
        print(f"  error: {status['error']}")
    print(
        f"  router   {status['router_url'] or '-'}" + (f"   API key {status['api_key']}" if status["api_key"] else "")
    )
    for site in status["sites"].values():
        print(f"  NATS     {site['name']:<12} {site['nats_url']}")
    for link in status["links"]:
        live = link["live"]
        if live:
            print(f"  link     {'-'.join(link['sites']):<12} {live['partition'] or 'up'}")
            for d in live["directions"]:
                print(f"           {d['src'] + '->' + d['dst']:<12} {_direction(d)}")
        else:
            print(
                f"  link     {'-'.join(link['sites']):<12} {link['gbps']:g} Gbps, {link['rtt_ms']:g} ms RTT (not answering)"
            )
    print(f"  {'process':<22} {'site':<8} {'pid':>7}  state")
    for p in status["processes"]:
        state = "alive" if p["alive"] else ("not started" if p["pid"] is None else f"exited ({p['exit_code']})")
        print(
            f"  {p['name']:<22} {p['site'] or '-':<8} {p['pid'] or '-':>7}  {state}{'' if p['ready'] else ', not ready'}"
        )
    return 0 if running else 1


def run_compose(args: argparse.Namespace) -> int:
    """Render the topology's compose project into ``--out``."""
    from libs.lab.compose import render, write
    from libs.lab.topology import load_topology

    files = render(load_topology(args.topology), topology_arg=args.topology, nats_users=args.nats_users)
    for path in write(files, args.out):
        print(path)
    return 0


def _direction(d: dict) -> str:
    """One direction's settings and live figures, for people."""
    used = "" if d["utilization"] is None else f" ({d['utilization']:.1%} of it)"
    return (
        f"{_gbps(d['gbps'])}, {2 * d['delay_ms']:g} ms RTT: {d['goodput_gbps']:.4g} Gbps now{used}, "
        f"{d['connections']} connections open, {d['bytes']:,} B carried"
    )


def _gbps(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:g} Gbps"


def run_down(args: argparse.Namespace) -> int:
    """Stop the lab in the run directory: SIGTERM its supervisor, wait, then make sure no child is left."""
    status = stop_lab(args.run_dir)
    if status is None:
        raise NotFound(f"no lab runs in {args.run_dir}")
    print(f"lab {status['topology']!r} stopped (logs in {Path(status['run_dir']) / 'logs'})", file=sys.stderr)
    return 0


def run_link(args: argparse.Namespace) -> int:
    """Send the change to the link's relay and print the link's figures afterwards."""
    status = running_status(args.run_dir)
    if status is None:
        raise NotFound(f"no lab runs in {args.run_dir} (start one with `prfaas lab up --detach`)")
    link = next((lk for lk in status["links"] if set(lk["sites"]) == {args.src, args.dst}), None)
    if link is None:
        pairs = ", ".join(" ".join(lk["sites"]) for lk in status["links"])
        raise BadRequest(f"no link between {args.src} and {args.dst} in this lab (links: {pairs})")
    changes: dict = {
        k: v for k, v in (("gbps", args.gbps), ("rtt_ms", args.rtt_ms), ("loss_pct", args.loss_pct)) if v is not None
    }
    if args.reset and not args.down:
        raise BadRequest("--reset goes with --down")
    if args.down or args.up:
        changes |= {"up": args.up} | ({"reset": True} if args.reset else {})
    if args.slow_start_after_idle is not None:
        changes["slow_start_after_idle"] = args.slow_start_after_idle
    if not changes:
        raise BadRequest(
            "nothing to change: give --gbps, --rtt-ms, --loss-pct, --down, --up or --[no-]slow-start-after-idle"
        )
    if args.one_way:
        if "up" in changes:
            raise BadRequest("--down/--up cut or restore both directions; drop --one-way")
        changes["src"] = args.src
    figures = change_link(link["control_url"], changes)
    for d in figures["directions"]:
        print(
            f"{d['src']} -> {d['dst']}: {_gbps(d['gbps'])}, {2 * d['delay_ms']:g} ms RTT, {d['loss_pct']:g}% loss, "
            f"{'up' if d['up'] else 'DOWN (' + str(figures['partition']) + ')'}, {d['bytes']:,} bytes carried"
        )
    return 0
