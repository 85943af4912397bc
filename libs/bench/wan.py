"""The WAN link emulator: achieved bandwidth at 1 and 10 Gbps, achieved RTT, the relay's ceiling, TCP's timing.

Three processes per measurement, as in the lab: a blaster (``--connections`` connections sending
as fast as they can), the link relay (``python -m libs.lab.wan_server``, the lab's own) and a
counting sink. Rates are taken over a window after a warm-up. Each round measures, interleaved:
direct loopback (the baseline: the same blaster and sink, no relay), the relay without a limit
(the ceiling), and the relay set to each ``--gbps`` value with the link's RTT. RTT is the median
ping-pong of 64-byte messages through the relay set to ``--rtt-ms`` (baseline: the same, direct).
Figures are medians over ``--rounds`` with their range (this machine is shared: compare ratios).

TCP's timing (``tcp_model``): at each ``--tcp-rtt-ms`` and ``--tcp-gbps``, the time to deliver
each of ``--tcp-sizes-mib`` on a new connection (connect to the last byte received), then on the
largest one's connection after ``--tcp-idle-s`` idle with slow start after idle (it restarts from
10 segments) and without it (it keeps its window, opened past the bandwidth-delay product first if
the largest size did not), each against
:func:`libs.lab.wan_tcp_model.delivery_time_s`; ``max_error`` is the largest relative error of a
case's median. ``keepalive``: at the first RTT, a warm connection sends one byte every
``--keepalive-ms`` through the idle period, then ``--keepalive-mib``: below the RTO (RTT + 200 ms)
the window is kept, above it the transfer slow-starts; judged against the model that applies.
Sender and receiver are threads of this process, the relay its own process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from libs.bench import wan_breaker
from libs.bench.targets import conclude
from libs.common.errors import ConfigError, UpstreamTimeout
from libs.lab.servers import free_port
from libs.lab.wan_cwnd import DEFAULT_WINDOW_BYTES, rto_s
from libs.lab.wan_probe import EchoServer, LinkedPair, ping_rtts_ms
from libs.lab.wan_server import change_link, link_figures
from libs.lab.wan_tcp_model import delivery_time_s

_PROBE = [sys.executable, "-m", "libs.lab.wan_probe"]
_RELAY = [sys.executable, "-m", "libs.lab.wan_server", "--log-level", "WARNING"]
_READY_TIMEOUT_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--gbps", default="1,10", help="bandwidths to set, comma-separated (default %(default)s)")
    parser.add_argument(
        "--rtt-ms", type=float, default=20.0, help="link RTT during every measurement (default %(default)s)"
    )
    parser.add_argument("--connections", type=int, default=4, help="blaster connections (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved bandwidth rounds (default %(default)s)")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="traffic before the window (default %(default)s)")
    parser.add_argument("--window-s", type=float, default=1.5, help="measured window (default %(default)s)")
    parser.add_argument("--pings", type=int, default=50, help="ping-pongs per RTT measurement (default %(default)s)")
    parser.add_argument("--tcp-rtt-ms", default="20,80", help="RTTs of the TCP timing cases (default %(default)s)")
    parser.add_argument(
        "--tcp-gbps", type=float, default=5.0, help="bandwidth of the TCP timing cases (default %(default)s)"
    )
    parser.add_argument(
        "--tcp-sizes-mib", default="1,16,256", help="transfer sizes of the TCP timing cases (default %(default)s)"
    )
    parser.add_argument(
        "--tcp-idle-s", type=float, default=1.0, help="idle period before a warm case (default %(default)s)"
    )
    parser.add_argument(
        "--tcp-rounds", type=int, default=3, help="rounds of the TCP timing cases (default %(default)s)"
    )
    parser.add_argument(
        "--keepalive-ms", default="100,300", help="keepalive intervals, at the first RTT (default %(default)s)"
    )
    parser.add_argument(
        "--keepalive-mib", type=float, default=16.0, help="transfer after the keepalives (default %(default)s)"
    )
    parser.add_argument(
        "--host-mib", type=float, default=16.0, help="kvwire transfer of the host-settings cases; 0 skips them"
    )
    parser.add_argument("--host-gbps", type=float, default=2.5, help="relay bandwidth of the host-settings cases")
    parser.add_argument("--host-window-mib", type=float, default=1.0, help="receive window of the narrow-window case")
    wan_breaker.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Measure and print the figures with their verdicts (exit 1 on a miss)."""
    set_gbps, rtts_ms, sizes_mib, keepalive_ms = (
        _numbers(args, flag) for flag in ("gbps", "tcp_rtt_ms", "tcp_sizes_mib", "keepalive_ms")
    )
    if any(g <= 0 for g in set_gbps) or args.rounds < 1 or args.connections < 1 or args.rtt_ms < 0:
        raise ConfigError("--gbps > 0, --rtt-ms >= 0, --rounds >= 1 and --connections >= 1")
    if min(rtts_ms + sizes_mib + keepalive_ms) <= 0 or args.tcp_gbps <= 0 or args.tcp_rounds < 1 or args.tcp_idle_s < 0:
        raise ConfigError("--tcp-rtt-ms, --tcp-sizes-mib, --keepalive-ms and --tcp-gbps > 0, --tcp-rounds >= 1")
    if args.host_mib < 0 or args.host_gbps <= 0 or args.host_window_mib <= 0:
        raise ConfigError("--host-mib >= 0, --host-gbps and --host-window-mib > 0")
    figures = _bench(args, set_gbps)
    figures |= _tcp(args, rtts_ms, [int(m * 2**20) for m in sorted(sizes_mib)], sorted(keepalive_ms))
    host = _host() if args.host_mib else None
    if host is not None:
        figures |= host.host_cases(args, rtts_ms)
    figures |= wan_breaker.figures(args)
    base = figures["baseline"]
    rows = [
        f"direct loopback (baseline)  {base['gbps']:7.2f} Gbps  range {_range(base['gbps_range'])}  "
        f"rtt {base['rtt_ms']:.3f} ms",
        f"relay ceiling (no limit)    {figures['ceiling_gbps']:7.2f} Gbps  range {_range(figures['ceiling_range'])}  "
        f"= {figures['ceiling_gbps'] / base['gbps']:.2f} of baseline",
    ]
    rows += [
        f"set {b['set_gbps']:6.2f} Gbps            {b['achieved_gbps']:7.2f} Gbps  range {_range(b['range'])}  "
        f"= {b['ratio']:.3f} of set"
        for b in figures["bandwidth"]
    ]
    d = figures["delay"]
    rows.append(
        f"set rtt {d['set_rtt_ms']:.1f} ms              {d['achieved_rtt_ms']:7.2f} ms    range {_range(d['range_ms'])}"
    )
    rows.append(f"{figures['connections']} connections, {figures['rounds']} rounds, medians")
    rows.append(f"delivery time vs TCP model at {args.tcp_gbps:g} Gbps, {args.tcp_rounds} rounds, medians:")
    for c in figures["tcp_model"]["cases"] + figures["keepalive"]["cases"]:
        rows.append(
            f"  {c['rtt_ms']:g} ms {c['case']:<34} {c['size_mib']:6g} MiB  {c['measured_ms']:8.1f} ms  "
            f"range {_range(c['range_ms'], 1)}  model {c['model_ms']:8.1f} ms  error {c['error']:+.3f}"
        )
    if host is not None:
        rows += host.text(figures)
    return conclude(args, figures, "\n".join(rows))


def _host():
    """The host-settings cases' module (imported only when they run: it imports this one)."""
    from libs.bench import wan_host

    return wan_host


def _numbers(args: argparse.Namespace, flag: str) -> list[float]:
    text = getattr(args, flag)
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--{flag.replace('_', '-')} {text!r}: expected comma-separated numbers") from None


def _range(r: list[float], digits: int = 2) -> str:
    return f"{r[0]:.{digits}f}-{r[1]:.{digits}f}"


def _bench(args: argparse.Namespace, set_gbps: list[float]) -> dict:
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(_Sink())
        free_link = stack.enter_context(LinkRelay(sink.port, gbps=None, rtt_ms=0.0))
        shaped = stack.enter_context(LinkRelay(sink.port, gbps=set_gbps[0], rtt_ms=args.rtt_ms))
        baseline: list[float] = []
        ceiling: list[float] = []
        achieved: dict[float, list[float]] = {g: [] for g in set_gbps}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
            baseline.append(sink.measure(sink.port, args))
            ceiling.append(sink.measure(free_link.port, args))
            for g in set_gbps:
                change_link(shaped.control_url, {"gbps": g})
                achieved[g].append(sink.measure(shaped.port, args))
        echo = EchoServer()
        stack.callback(echo.close)
        rtt_relay = stack.enter_context(LinkRelay(echo.port, gbps=max(set_gbps), rtt_ms=args.rtt_ms))
        direct_rtts = ping_rtts_ms(("127.0.0.1", echo.port), args.pings)
        relay_rtts = ping_rtts_ms(("127.0.0.1", rtt_relay.port), args.pings)
    ratios = [statistics.median(runs) / g for g, runs in achieved.items()]
    return {
        "bandwidth": [
            {
                "set_gbps": g,
                "achieved_gbps": statistics.median(runs),
                "range": [min(runs), max(runs)],
                "ratio": statistics.median(runs) / g,
                "runs": runs,
            }
            for g, runs in achieved.items()
        ],
        "bandwidth_ratio": {"min": min(ratios), "max": max(ratios)},  # the worst set bandwidths, either side
        "delay": {
            "set_rtt_ms": args.rtt_ms,
            "achieved_rtt_ms": statistics.median(relay_rtts),
            "error_ms": abs(statistics.median(relay_rtts) - args.rtt_ms),
            "range_ms": [min(relay_rtts), max(relay_rtts)],
        },
        "ceiling_gbps": statistics.median(ceiling),
        "ceiling_range": [min(ceiling), max(ceiling)],
        "baseline": {
            "gbps": statistics.median(baseline),
            "gbps_range": [min(baseline), max(baseline)],
            "rtt_ms": statistics.median(direct_rtts),
        },
        "connections": args.connections,
        "rounds": args.rounds,
        "rtt_ms_during_bandwidth": args.rtt_ms,
    }


def _tcp(args: argparse.Namespace, rtts_ms: list[float], sizes: list[int], keepalive_ms: list[float]) -> dict:
    """Delivery times of the TCP cases over ``--tcp-rounds`` rounds, against the model: ``tcp_model`` and ``keepalive``."""
    runs: dict[tuple[float, str, int], list[float]] = {}
    models: dict[tuple[float, str, int], float] = {}
    with socket.create_server(("127.0.0.1", 0)) as target:
        target.settimeout(_READY_TIMEOUT_S)
        with LinkRelay(target.getsockname()[1], gbps=args.tcp_gbps, rtt_ms=rtts_ms[0]) as relay:
            for r in range(args.tcp_rounds):
                print(f"tcp round {r + 1}/{args.tcp_rounds} ...", file=sys.stderr, flush=True)
                for rtt_ms in rtts_ms:
                    intervals = keepalive_ms if rtt_ms == rtts_ms[0] else []
                    for case, size, took_s, model_s in _tcp_cases(relay, target, args, rtt_ms, sizes, intervals):
                        runs.setdefault((rtt_ms, case, size), []).append(took_s)
                        models[(rtt_ms, case, size)] = model_s
    cases = []
    for (rtt_ms, case, size), took in runs.items():
        model_s = models[(rtt_ms, case, size)]
        cases.append(
            {
                "rtt_ms": rtt_ms,
                "case": case,
                "size_mib": size / 2**20,
                "model_ms": model_s * 1e3,
                "measured_ms": statistics.median(took) * 1e3,
                "range_ms": [min(took) * 1e3, max(took) * 1e3],
                "error": statistics.median(took) / model_s - 1,
                "runs_ms": [t * 1e3 for t in took],
            }
        )
    tcp = [c for c in cases if not c["case"].startswith("keepalive")]
    kept = [c for c in cases if c["case"].startswith("keepalive")]
    return {
        "tcp_model": {
            "gbps": args.tcp_gbps,
            "idle_s": args.tcp_idle_s,
            "rounds": args.tcp_rounds,
            "cases": tcp,
            "max_error": max(abs(c["error"]) for c in tcp),
        },
        "keepalive": {"cases": kept, "max_error": max((abs(c["error"]) for c in kept), default=0.0)},
    }


def _tcp_cases(
    relay: LinkRelay,
    target: socket.socket,
    args: argparse.Namespace,
    rtt_ms: float,
    sizes: list[int],
    keepalive_ms: list[float],
) -> Iterator[tuple[str, int, float, float]]:
    """(case, bytes, seconds taken, seconds modelled) at one RTT: new connections, idle ones, kept-alive ones."""
    change_link(relay.control_url, {"rtt_ms": rtt_ms, "slow_start_after_idle": True})
    model = functools.partial(delivery_time_s, gbps=args.tcp_gbps, rtt_s=rtt_ms / 1000)
    address = ("127.0.0.1", relay.port)
    for size in sizes:
        pair = LinkedPair(address, target)
        yield "new connection", size, pair.transfer_s(size, since=pair.opened_at), model(size)
        if size != sizes[-1]:
            pair.close()
    with pair:
        for size in sizes:
            time.sleep(args.tcp_idle_s)  # the idle period under test
            yield "idle, slow start after idle", size, pair.transfer_s(size), model(size, handshake=False)
        change_link(relay.control_url, {"slow_start_after_idle": False})
        opening = int(4 * min(args.tcp_gbps * 1e9 / 8 * rtt_ms / 1000, DEFAULT_WINDOW_BYTES))
        if sizes[-1] < opening:  # slow start passes the bandwidth-delay product after sending about twice it
            pair.transfer_s(opening)
        for size in sizes:
            time.sleep(args.tcp_idle_s)
            yield (
                "idle, window kept",
                size,
                pair.transfer_s(size),
                model(size, handshake=False, cwnd_bytes=DEFAULT_WINDOW_BYTES),
            )
        change_link(relay.control_url, {"slow_start_after_idle": True})
        size = int(args.keepalive_mib * 2**20)
        for interval_ms in keepalive_ms:  # ascending: a kept window stays open for the next interval
            start = time.monotonic()
            for tick in range(1, int(args.tcp_idle_s * 1000 / interval_ms) + 1):
                time.sleep(max(0.0, start + tick * interval_ms / 1000 - time.monotonic()))
                pair.transfer_s(1)
            time.sleep(max(0.0, start + args.tcp_idle_s - time.monotonic()))
            kept = interval_ms / 1000 < rto_s(rtt_ms / 1000)
            window = {"cwnd_bytes": DEFAULT_WINDOW_BYTES} if kept else {}  # else slow start from 10 segments
            case = f"keepalive {interval_ms:g} ms, {'window kept' if kept else 'slow start'}"
            yield case, size, pair.transfer_s(size), model(size, handshake=False, **window)


class _Sink:
    """A counting sink process, sampled over its stdin."""

    def __enter__(self) -> _Sink:
        self.proc = subprocess.Popen([*_PROBE, "sink"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.port = json.loads(self.proc.stdout.readline())["port"]
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def sample(self) -> tuple[int, float]:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        got = json.loads(self.proc.stdout.readline())
        return got["bytes"], got["t"]

    def measure(self, port: int, args: argparse.Namespace) -> float:
        """Gbps the sink receives from a blaster process sending to ``port`` (after warm-up, over the window)."""
        duration_s = args.warmup_s + args.window_s + 0.5
        blaster = subprocess.Popen(
            [
                *_PROBE,
                "blast",
                "--to",
                f"127.0.0.1:{port}",
                "--connections",
                str(args.connections),
                "--duration-s",
                str(duration_s),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(args.warmup_s)
            b0, t0 = self.sample()
            time.sleep(args.window_s)
            b1, t1 = self.sample()
            blaster.wait(timeout=duration_s + 30)
        finally:
            if blaster.poll() is None:
                blaster.kill()
                blaster.wait()
        time.sleep(0.2)  # let the link drain before the next measurement
        return (b1 - b0) * 8 / (t1 - t0) / 1e9


class LinkRelay:
    """A link relay process carrying site a -> b to ``target_port`` (``window_mib``: each connection's receive window)."""

    def __init__(self, target_port: int, *, gbps: float | None, rtt_ms: float, window_mib: float | None = None) -> None:
        self.port, control = free_port(), free_port()
        self.control_url = f"http://127.0.0.1:{control}"
        self.argv = [
            *_RELAY,
            "--sites",
            "a",
            "b",
            "--rtt-ms",
            str(rtt_ms),
            "--control",
            f"127.0.0.1:{control}",
            "--forward",
            f"a@127.0.0.1:{self.port}=127.0.0.1:{target_port}",
        ]
        if gbps is not None:
            self.argv += ["--gbps", str(gbps)]
        if window_mib is not None:
            self.argv += ["--window-mib", str(window_mib)]

    def __enter__(self) -> LinkRelay:
        self.proc = subprocess.Popen(self.argv)
        end = time.monotonic() + _READY_TIMEOUT_S
        while True:
            try:
                link_figures(self.control_url, timeout_s=0.5)
                return self
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > end:
                    self.__exit__()
                    raise UpstreamTimeout(f"relay did not start: {' '.join(self.argv)}") from None
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
