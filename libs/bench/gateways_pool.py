"""``prfaas bench gateways``, pool figures: TTFT of a long remote request across a WAN relay, cold pool vs warm.

A prefill gateway (simulated H200, ``kimi-linear-1t`` KV at ``--pool-byte-scale``, layer-wise, paced
at ``--pool-gbps``) sends to a decode gateway (simulated H20) that it reaches through a link relay of
the same bandwidth (the lab sets its budgets to the link's bandwidth). Its pool closes connections
idle for ``POOL_IDLE_S``. For each RTT of ``--pool-rtt-ms``, each repeat sends a ``--pool-tokens``
prompt three times, each with a first block of its own (nothing cached anywhere):

- **cold**: once the relay carries no connection of the pool (its idle timeout closed them, as after
  a start): the connects, the begin and slow start of every stripe;
- **warm**: after an idle gap of ``GAP_S`` (longer than the RTO: without keepalives the relay would
  restart slow start; shorter than the pool's timeout) on the connections the cold one opened;
- **baseline**: the relay set to 0 ms, after the same idle gap on the same warm connections: the
  paced transfer with no WAN delay (bytes serialised at the same link rate).

``exposed_rtts``: the part of TTFT the KV path holds up (TTFT less the prefill as its gateway
measured it and less the decode side's restore of the verified state, its ``queue_s``: the simulated
chip's sleeps overshoot and the restore copies the state, tens to hundreds of ms on a busy machine,
more than an RTT and unrelated to the path), less the same for the baseline of the same repeat, over
the RTT: what the path's delay costs beyond the paced transfer (half an RTT of it is the last byte's
way across). The judged
``warm_pool.exposed_rtts`` / ``cold_pool.exposed_rtts`` are the largest per-RTT median.
The job's own NATS messages do not cross the relay (they take the supercluster's direct route).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

from libs.bench.gateways import DECODE_SITE, PREFILL_SITE, Caller, _figure, _finished
from libs.bench.wan import LinkRelay
from libs.common.errors import ConfigError, UpstreamTimeout
from libs.lab.servers import free_port
from libs.lab.wan_cwnd import rto_s
from libs.lab.wan_server import change_link, link_figures

POOL_MODEL = "kimi-linear-1t"
POOL_IDLE_S = 1.5  # the prefill gateway's pool timeout: a cold request waits this long for it
GAP_S = 0.5  # idle gap before a warm request: over the RTO (RTT + 200 ms) of every RTT measured, under POOL_IDLE_S
PREFILL, DECODE = "pool-p0", "pool-d0"


def rtts_ms(args: argparse.Namespace) -> list[float]:
    """The RTTs of ``--pool-rtt-ms`` (empty: the case is skipped)."""
    try:
        rtts = [float(x) for x in args.pool_rtt_ms.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--pool-rtt-ms {args.pool_rtt_ms!r}: expected comma-separated numbers") from None
    if any(r <= 0 or rto_s(r / 1e3) >= GAP_S for r in rtts) or args.pool_gbps <= 0 or args.pool_tokens < 128:
        raise ConfigError(
            f"--pool-rtt-ms > 0 and under {(GAP_S - rto_s(0)) * 1e3:.0f} ms (the idle gap must pass the RTO); "
            "--pool-gbps > 0; --pool-tokens >= 128"
        )
    return rtts


def plan(fleet, args: argparse.Namespace) -> LinkRelay:
    """Add the case's gateways to ``fleet``; the relay (not started) that carries their KV."""
    decode_port = free_port()
    relay = LinkRelay(decode_port, gbps=args.pool_gbps, rtt_ms=0.0)
    model = {"model": POOL_MODEL, "byte_scale": args.pool_byte_scale}
    fleet.add(
        "prefill_gateway",
        PREFILL_SITE,
        PREFILL,
        cluster="bench",
        instances=PREFILL,
        backend="simulated:h200",
        budgets=f"{DECODE_SITE}={args.pool_gbps}",
        tcp_pool_idle_s=POOL_IDLE_S,
        **model,
    )
    fleet.add(
        "decode_gateway",
        DECODE_SITE,
        DECODE,
        instance=DECODE,
        backend="simulated:h20",
        tcp_port=decode_port,
        advertise_by_site=f"{PREFILL_SITE}=127.0.0.1:{relay.port}",
        **model,
    )
    return relay


@dataclass(frozen=True)
class _Request:
    """One request's figures (seconds)."""

    ttft: float
    held_up: float  # TTFT less the prefill and the decode side's restore: what the KV path holds up
    sender_exposed: float  # the prefill gateway's end of compute to the receiver's answer that all is verified
    restore: float  # the decode side's restore of the verified state (its queue_s)
    opened: int  # connections the relay accepted during the request


class _Requests:
    """The case's requests, each with a prompt of its own, and the relay's connection counts around them."""

    def __init__(self, caller: Caller, relay: LinkRelay, tokens: int) -> None:
        self.caller, self.relay, self.tokens = caller, relay, tokens
        self.sent = 0

    async def ttft_s(self) -> _Request:
        """One request's times, and the connections the relay accepted meanwhile."""
        self.sent += 1
        prompt = [self.sent, *range(1, self.tokens)]  # its own first block: no prefix is held anywhere
        before = await self._figures()
        out = await self.caller.request(
            prompt, DECODE, model=POOL_MODEL, max_tokens=2, prefill_instance=PREFILL, timeout_s=60.0
        )
        final, status = _finished(out)
        opened = (await self._figures())["connections_total"] - before["connections_total"]
        held_up = out.first_token_s - status.prefill_s - final.timings.queue_s
        return _Request(out.first_token_s, held_up, status.transfer_exposed_s, final.timings.queue_s, opened)

    async def set_rtt(self, rtt_ms: float) -> None:
        """Change the relay's RTT (both directions)."""
        await asyncio.to_thread(change_link, self.relay.control_url, {"rtt_ms": rtt_ms})

    async def pool_closed(self, timeout_s: float = POOL_IDLE_S + 10.0) -> None:
        """Wait until the relay carries no connection (the pool's idle timeout closed them)."""
        end = time.monotonic() + timeout_s
        while (await self._figures())["connections"]:
            if time.monotonic() > end:
                raise UpstreamTimeout(f"the pool's connections were still open {timeout_s:.0f}s on")
            await asyncio.sleep(0.05)  # the relay's count, polled: no event tells a connection's end

    async def _figures(self) -> dict:
        return await asyncio.to_thread(link_figures, self.relay.control_url)


async def pool_case(caller: Caller, relay: LinkRelay, args: argparse.Namespace) -> dict:
    """Cold, warm and baseline TTFTs at each RTT, interleaved per repeat; exposed time in RTTs."""
    requests = _Requests(caller, relay, args.pool_tokens)
    await requests.ttft_s()  # untimed: the decode side's arena pages and both processes' first-use costs
    runs: dict[float, dict[str, list[_Request]]] = {}
    for rtt in rtts_ms(args):
        run = runs[rtt] = {"cold": [], "warm": [], "baseline": []}
        for _ in range(args.repeats):
            await requests.pool_closed()
            await requests.set_rtt(rtt)
            run["cold"].append(await requests.ttft_s())
            await asyncio.sleep(GAP_S)  # the idle gap under test
            run["warm"].append(await requests.ttft_s())
            await requests.set_rtt(0.0)
            await asyncio.sleep(GAP_S)  # the same idle gap: everything but the path's delay as for the warm one
            run["baseline"].append(await requests.ttft_s())
    opened = {kind: [r.opened for run in runs.values() for r in run[kind]] for kind in ("cold", "warm")}
    return {
        "cold_pool": _exposed(runs, "cold") | {"connections_opened": _figure(opened["cold"])},
        "warm_pool": _exposed(runs, "warm") | {"connections_opened": _figure(opened["warm"])},
        "pool_baseline": {"by_rtt_ms": {f"{r:g}": _times(run["baseline"]) for r, run in runs.items()}},
        "pool_setup": {
            "model": POOL_MODEL,
            "tokens": args.pool_tokens,
            "gbps": args.pool_gbps,
            "byte_scale": args.pool_byte_scale,
            "pool_idle_s": POOL_IDLE_S,
            "gap_s": GAP_S,
            "repeats": args.repeats,
        },
    }


def _times(requests: list[_Request]) -> dict:
    return {
        "ttft_s": _figure([r.ttft for r in requests]),
        "held_up_ms": _figure([r.held_up * 1e3 for r in requests]),
        "sender_exposed_ms": _figure([r.sender_exposed * 1e3 for r in requests]),
        "decode_restore_ms": _figure([r.restore * 1e3 for r in requests]),
    }


def _exposed(runs: dict[float, dict[str, list[_Request]]], kind: str) -> dict:
    by_rtt = {}
    for rtt, run in runs.items():
        exposed = [r.held_up - b.held_up for r, b in zip(run[kind], run["baseline"], strict=True)]
        by_rtt[f"{rtt:g}"] = _times(run[kind]) | {
            "exposed_ms": _figure([e * 1e3 for e in exposed]),
            "exposed_rtts": _figure([e * 1e3 / rtt for e in exposed]),
        }
    return {"exposed_rtts": max(f["exposed_rtts"]["median"] for f in by_rtt.values()), "by_rtt_ms": by_rtt}


def text(figures: dict) -> list[str]:
    """The pool figures for people."""
    s = figures["pool_setup"]
    rows = [
        f"pool ({s['tokens']} tokens, {s['model']} KV x{s['byte_scale']:g}, simulated H200 -> H20, relay and budget "
        f"{s['gbps']:g} Gbps; warm after {s['gap_s']:g} s idle, pool timeout {s['pool_idle_s']:g} s): TTFT, the part "
        f"the KV path held up (TTFT less prefill and decode-side restore), and that part beyond the same request's at "
        f"0 ms RTT; medians [range]"
    ]
    for rtt, base in figures["pool_baseline"]["by_rtt_ms"].items():
        rows.append(_row(rtt, "baseline (0 ms)", base))
        for kind in ("cold_pool", "warm_pool"):
            rows.append(_row(rtt, kind.replace("_", " "), figures[kind]["by_rtt_ms"][rtt]))
    opened = (figures["cold_pool"]["connections_opened"]["median"], figures["warm_pool"]["connections_opened"]["max"])
    rows.append(f"  connections opened per request: cold {opened[0]:g} (median), warm {opened[1]:g} (most)")
    return rows


def _row(rtt: str, name: str, f: dict) -> str:
    t, h = f["ttft_s"], f["held_up_ms"]
    row = f"  {rtt:>4} ms  {name:15s}  TTFT {t['median']:.3f} s  held up {h['median']:6.1f} ms [{h['min']:.1f} .. {h['max']:.1f}]"
    if "exposed_ms" in f:
        e, r = f["exposed_ms"], f["exposed_rtts"]
        row += f"  exposed {e['median']:6.1f} ms = {r['median']:5.2f} RTT [{r['min']:.2f} .. {r['max']:.2f}]"
    return row
