"""The WAN link emulator: achieved bandwidth at 1 and 10 Gbps, achieved RTT, and the relay's ceiling.

Three processes per measurement, as in the lab: a blaster (``--connections`` connections sending
as fast as they can), the link relay (``python -m libs.lab.wan_server``, the lab's own) and a
counting sink. Rates are taken over a window after a warm-up. Each round measures, interleaved:
direct loopback (the baseline: the same blaster and sink, no relay), the relay without a limit
(the ceiling), and the relay set to each ``--gbps`` value with the link's RTT. RTT is the median
ping-pong of 64-byte messages through the relay set to ``--rtt-ms`` (baseline: the same, direct).
Figures are medians over ``--rounds`` with their range (this machine is shared: compare ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time

from libs.bench.targets import conclude
from libs.common.errors import ConfigError, UpstreamTimeout
from libs.lab.servers import free_port
from libs.lab.wan_probe import EchoServer, ping_rtts_ms
from libs.lab.wan_server import change_link, link_figures

_PROBE = [sys.executable, "-m", "libs.lab.wan_probe"]
_RELAY = [sys.executable, "-m", "libs.lab.wan_server", "--log-level", "WARNING"]
_READY_TIMEOUT_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--gbps", default="1,10", help="bandwidths to set, comma-separated (default %(default)s)")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="link RTT during every measurement (default %(default)s)")
    parser.add_argument("--connections", type=int, default=4, help="blaster connections (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default %(default)s)")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="traffic before the window (default %(default)s)")
    parser.add_argument("--window-s", type=float, default=1.5, help="measured window (default %(default)s)")
    parser.add_argument("--pings", type=int, default=50, help="ping-pongs per RTT measurement (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Measure and print the figures with their verdicts (exit 1 on a miss)."""
    try:
        set_gbps = [float(g) for g in args.gbps.split(",")]
    except ValueError:
        raise ConfigError(f"--gbps {args.gbps!r}: expected comma-separated numbers") from None
    if any(g <= 0 for g in set_gbps) or args.rounds < 1 or args.connections < 1 or args.rtt_ms < 0:
        raise ConfigError("--gbps > 0, --rtt-ms >= 0, --rounds >= 1 and --connections >= 1")
    figures = _bench(args, set_gbps)
    base = figures["baseline"]
    rows = [f"direct loopback (baseline)  {base['gbps']:7.2f} Gbps  range {_range(base['gbps_range'])}  "
            f"rtt {base['rtt_ms']:.3f} ms",
            f"relay ceiling (no limit)    {figures['ceiling_gbps']:7.2f} Gbps  range {_range(figures['ceiling_range'])}  "
            f"= {figures['ceiling_gbps'] / base['gbps']:.2f} of baseline"]  # fmt: skip
    rows += [f"set {b['set_gbps']:6.2f} Gbps            {b['achieved_gbps']:7.2f} Gbps  range {_range(b['range'])}  "
             f"= {b['ratio']:.3f} of set" for b in figures["bandwidth"]]  # fmt: skip
    d = figures["delay"]
    rows.append(f"set rtt {d['set_rtt_ms']:.1f} ms              {d['achieved_rtt_ms']:7.2f} ms    range {_range(d['range_ms'])}")
    rows.append(f"{figures['connections']} connections, {figures['rounds']} rounds, medians")
    return conclude(args, figures, "\n".join(rows))


def _range(r: list[float]) -> str:
    return f"{r[0]:.2f}-{r[1]:.2f}"


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
            [*_PROBE, "blast", "--to", f"127.0.0.1:{port}", "--connections", str(args.connections),
             "--duration-s", str(duration_s)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
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
    """A link relay process carrying site a -> b to ``target_port``."""

    def __init__(self, target_port: int, *, gbps: float | None, rtt_ms: float) -> None:
        self.port, control = free_port(), free_port()
        self.control_url = f"http://127.0.0.1:{control}"
        self.argv = [*_RELAY, "--sites", "a", "b", "--rtt-ms", str(rtt_ms), "--control", f"127.0.0.1:{control}",
                     "--forward", f"a@127.0.0.1:{self.port}=127.0.0.1:{target_port}"]  # fmt: skip
        if gbps is not None:
            self.argv += ["--gbps", str(gbps)]

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
