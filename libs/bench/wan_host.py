"""``prfaas bench wan``, host settings: kvwire transfers over the relay with each knob a deployment sets.

At each ``--tcp-rtt-ms`` and ``--host-gbps``, ``--host-mib`` over 4 stripes from a ``KvSender`` to a
receiver behind a relay process, timed from the send's start to the receiver's verification,
medians over ``--tcp-rounds``:

- ``new connections``: no pool: connect, begin and slow start for every transfer;
- ``warm, keepalive``: a pooled transfer after ``--tcp-idle-s`` idle with a keepalive every 100 ms;
- ``warm, slow start after idle``: the same without keepalives, the relay restarting slow start
  after an idle RTO (``net.ipv4.tcp_slow_start_after_idle=1``, Linux's default);
- ``warm, no slow start after idle``: without keepalives, the relay keeping the window (``=0``);
- ``warm, receive window``: keepalives, through a relay whose receive window is ``--host-window-mib``
  (a host whose ``net.ipv4.tcp_rmem`` maximum, or a socket buffer set below it, is under a stripe's
  share of the bandwidth-delay product): each stripe carries at most a window per RTT.

The warm cases first open the stripes' windows with an untimed transfer of twice the
bandwidth-delay product. Each case is shown beside its :func:`libs.lab.wan_tcp_model.delivery_time_s`
model (one RTT for the begin, each stripe a quarter of the bytes and of the bandwidth, plus one
RTT of connect when new), and ``beyond_kept_rtts``: its median over the kept window's model, in RTTs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from libs.bench.wan import LinkRelay
from libs.common.state_parts import PartSpec, StatePart
from libs.kvwire import (
    Destination,
    KvLinks,
    KvReceiver,
    KvSender,
    ReceiverConfig,
    TcpConfig,
    TcpReceiverServer,
    TcpTransport,
)
from libs.lab.wan_cwnd import DEFAULT_WINDOW_BYTES
from libs.lab.wan_server import change_link
from libs.lab.wan_tcp_model import delivery_time_s

SRC, DST = "dc-a", "dc-b"
STRIPES = 4
KEEPALIVE_S = 0.1
CASES = (
    "new connections",
    "warm, keepalive",
    "warm, slow start after idle",
    "warm, no slow start after idle",
    "warm, receive window",
)


def host_cases(args: argparse.Namespace, rtts_ms: list[float]) -> dict:
    """Every case at every RTT over ``--tcp-rounds`` rounds, with its model: ``host_settings``."""
    return asyncio.run(_host_cases(args, rtts_ms))


async def _host_cases(args: argparse.Namespace, rtts_ms: list[float]) -> dict:
    size = int(args.host_mib * 2**20)
    parts = [
        StatePart(i, "attn_kv", "k", np.zeros((size // STRIPES // 256, 128), dtype=np.float16)) for i in range(STRIPES)
    ]
    runs: dict[tuple[float, str], list[float]] = {}
    config = ReceiverConfig(max_total_bytes=4 * size + (512 << 20), max_transfer_bytes=4 * size + (256 << 20))
    async with KvReceiver(config) as receiver, TcpReceiverServer(receiver) as server:
        port = server.address[1]
        with (
            LinkRelay(port, gbps=args.host_gbps, rtt_ms=rtts_ms[0]) as wide,
            LinkRelay(port, gbps=args.host_gbps, rtt_ms=rtts_ms[0], window_mib=args.host_window_mib) as narrow,
        ):
            bench = _Bench(receiver, args)
            for r in range(args.tcp_rounds):
                print(f"host round {r + 1}/{args.tcp_rounds} ...", file=sys.stderr, flush=True)
                for rtt_ms in rtts_ms:
                    for case, took in (await bench.round(wide, narrow, rtt_ms, parts)).items():
                        runs.setdefault((rtt_ms, case), []).append(took)
    cases = [_case(args, rtt_ms, case, sum(p.nbytes for p in parts), took) for (rtt_ms, case), took in runs.items()]
    return {
        "host_settings": {
            "gbps": args.host_gbps,
            "size_mib": args.host_mib,
            "window_mib": args.host_window_mib,
            "idle_s": args.tcp_idle_s,
            "stripes": STRIPES,
            "cases": cases,
            "max_error": max(abs(c["error"]) for c in cases),
        }
    }


class _Bench:
    """Senders of the cases and the receiver they send to."""

    def __init__(self, receiver: KvReceiver, args: argparse.Namespace) -> None:
        self.receiver, self.args = receiver, args
        self.sent = 0

    async def round(self, wide: LinkRelay, narrow: LinkRelay, rtt_ms: float, parts: list[StatePart]) -> dict:
        """Seconds each case took at ``rtt_ms``."""
        for relay in (wide, narrow):
            await asyncio.to_thread(change_link, relay.control_url, {"rtt_ms": rtt_ms, "slow_start_after_idle": True})
        opening = 2 * int(self.args.host_gbps * 1e9 / 8 * rtt_ms / 1e3)
        took = {"new connections": await self._fresh(wide, parts)}
        took["warm, keepalive"] = await self._after_idle(wide, parts, opening, KEEPALIVE_S)
        took["warm, slow start after idle"] = await self._after_idle(wide, parts, opening, 0.0)
        await asyncio.to_thread(change_link, wide.control_url, {"slow_start_after_idle": False})
        took["warm, no slow start after idle"] = await self._after_idle(wide, parts, opening, 0.0)
        took["warm, receive window"] = await self._after_idle(narrow, parts, opening, KEEPALIVE_S)
        return took

    async def _fresh(self, relay: LinkRelay, parts: list[StatePart]) -> float:
        transport = TcpTransport(TcpConfig(connections=STRIPES, chunk_bytes=1 << 20, pool=False))
        try:
            return await self._send(transport, relay, parts)
        finally:
            await transport.close()

    async def _after_idle(self, relay: LinkRelay, parts: list[StatePart], opening: int, keepalive_s: float) -> float:
        transport = TcpTransport(TcpConfig(connections=STRIPES, chunk_bytes=1 << 20, keepalive_s=keepalive_s))
        try:
            count = max(1, -(-opening // sum(p.nbytes for p in parts)))
            for _ in range(count):  # untimed: opens every stripe's window past its share of the BDP
                await self._send(transport, relay, parts)
            await asyncio.sleep(self.args.tcp_idle_s)  # the idle period under test
            return await self._send(transport, relay, parts)
        finally:
            await transport.close()

    async def _send(self, transport: TcpTransport, relay: LinkRelay, parts: list[StatePart]) -> float:
        self.sent += 1
        tid = f"host-{self.sent}"
        async with KvLinks(SRC) as links:
            sender = KvSender(transport, links)
            specs = [PartSpec.of(p, "raw") for p in parts]
            manifest = sender.manifest(
                transfer_id=tid, dst_site=DST, model="bench", block_size=64, num_tokens=1, specs=specs
            )
            waiter = asyncio.create_task(self.receiver.wait(tid, timeout_s=60))
            started = time.monotonic()
            await sender.send(manifest, parts, Destination(DST, "bench", "127.0.0.1", relay.port))
            with await waiter as done:
                return done.completed_at - started


def _case(args: argparse.Namespace, rtt_ms: float, case: str, size: int, took: list[float]) -> dict:
    rtt = rtt_ms / 1e3
    model = _models(args, rtt, size)
    median = statistics.median(took)
    return {
        "rtt_ms": rtt_ms,
        "case": case,
        "measured_ms": median * 1e3,
        "range_ms": [min(took) * 1e3, max(took) * 1e3],
        "model_ms": model[case]() * 1e3,
        "error": median / model[case]() - 1,
        "beyond_kept_rtts": (median - model["warm, keepalive"]()) / rtt,
        "runs_ms": [t * 1e3 for t in took],
    }


def _models(args: argparse.Namespace, rtt: float, size: int) -> dict[str, Callable[[], float]]:
    """Each case's modelled seconds: the begin's round trip, then each stripe's quarter over its quarter of the link."""
    stripe = {"size_bytes": size // STRIPES, "gbps": args.host_gbps / STRIPES, "rtt_s": rtt, "handshake": False}
    window = int(args.host_window_mib * 2**20)
    kept = {"cwnd_bytes": DEFAULT_WINDOW_BYTES}
    return {
        "new connections": lambda: 2 * rtt + delivery_time_s(**stripe),
        "warm, keepalive": lambda: rtt + delivery_time_s(**stripe, **kept),
        "warm, slow start after idle": lambda: rtt + delivery_time_s(**stripe),
        "warm, no slow start after idle": lambda: rtt + delivery_time_s(**stripe, **kept),
        "warm, receive window": lambda: rtt + delivery_time_s(**stripe, cwnd_bytes=window, window_bytes=window),
    }


def text(figures: dict) -> list[str]:
    """The host-settings cases for people."""
    h = figures["host_settings"]
    rows = [
        f"host settings: {h['size_mib']:g} MiB over {h['stripes']} stripes at {h['gbps']:g} Gbps, "
        f"{h['idle_s']:g} s idle before a warm case, narrow window {h['window_mib']:g} MiB; medians vs model:"
    ]
    for c in h["cases"]:
        rows.append(
            f"  {c['rtt_ms']:g} ms {c['case']:<32} {c['measured_ms']:8.1f} ms  range {c['range_ms'][0]:.1f}-"
            f"{c['range_ms'][1]:.1f}  model {c['model_ms']:8.1f} ms  error {c['error']:+.3f}  "
            f"{c['beyond_kept_rtts']:+6.2f} RTT beyond a kept window"
        )
    return rows
