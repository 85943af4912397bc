"""KV transfer goodput between two processes (direct TCP or JetStream across two NATS sites) vs baselines.

Moves a synthetic hybrid-model transfer (2 linear layers' fixed state, 8 attention layers' K/V
sized to ``--size``) from this process to a receiver process and prints the goodput, the raw
loopback baseline (blocking ``sendall``/``recv_into`` between two threads, preallocated buffers)
and their ratio; ``--repeat`` rounds interleave baselines and transfers, and the best of each counts
(the machine is shared: the best is the least disturbed). For JetStream the two
sites are a fresh supercluster joined by a gateway, and the same bytes are also sent as plain NATS
publish/subscribe across it (credit-windowed like the publish-ack window). With ``--budget-gbps``
the link is paced and the largest rate over any window of at least one second is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from libs.common.bus import connect
from libs.common.errors import TransferFailed
from libs.bench.kv_procs import (
    core_nats_source,
    part_checksums,
    raw_loopback_gbps,
    receiver_process,
    synthetic_parts,
)
from libs.kvwire.js_send import JetStreamConfig, JetStreamTransport
from libs.kvwire.linkstats import KvLinks, LinkConfig
from libs.kvwire.sender import Destination, KvSender, SendReport
from libs.kvwire.tcp_send import TcpConfig, TcpTransport
from libs.lab.servers import Supercluster

SRC_SITE, DST_SITE, INSTANCE = "dc-prfaas", "dc-pd", "bench-decode"
SAMPLE_S = 0.05
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """``512MiB``, ``1GB``, ``4096`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512MiB, 1GB, 4096)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--transport", choices=("tcp", "jetstream"), default="tcp")
    parser.add_argument("--size", type=parse_size, default=parse_size("512MiB"), help="transfer size (512MiB)")
    parser.add_argument("--budget-gbps", type=float, default=0.0, help="pace the site pair (0: unpaced)")
    parser.add_argument("--connections", type=int, default=TcpConfig.connections, help="TCP connections")
    parser.add_argument("--chunk", type=parse_size, default=None, help="chunk size (transport default)")
    parser.add_argument("--codec", choices=("raw", "zstd", "int8"), default="raw", help="codec of attn_kv parts")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of baseline + transfer; the best of each counts")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print its figures."""
    figures = asyncio.run(_bench(args))
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"transport          {figures['transport']}  ({figures['size_bytes'] / 2**20:.0f} MiB, "
          f"codec {figures['codec']}, verified {figures['verified']})")
    print(f"goodput            {figures['goodput_gbps']:8.2f} Gbps  ({figures['duration_s']:.2f} s; best of "
          f"{len(figures['goodput_runs_gbps'])}: {', '.join(f'{g:.2f}' for g in figures['goodput_runs_gbps'])})")
    print(f"raw loopback       {figures['raw_gbps']:8.2f} Gbps  ratio {figures['ratio']:.2f} "
          f"(medians: {figures['ratio_median']:.2f})")
    if "nats_core_gbps" in figures:
        print(f"plain NATS core    {figures['nats_core_gbps']:8.2f} Gbps  jetstream/core "
              f"{figures['jetstream_vs_core']:.2f} (medians: {figures['jetstream_vs_core_median']:.2f})")
    if "budget_gbps" in figures:
        print(f"budget             {figures['budget_gbps']:8.2f} Gbps  achieved "
              f"{figures['goodput_gbps'] / figures['budget_gbps']:.3f}, max 1 s window "
              f"{figures['max_window_gbps']:.3f} Gbps ({figures['max_window_gbps'] / figures['budget_gbps']:.3f})")
    return 0


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def _bench(args: argparse.Namespace) -> dict:
    specs, parts = synthetic_parts(args.size, args.codec)
    payload_bytes = sum(p.nbytes for p in parts)
    capacity = payload_bytes * 2 + (64 << 20)
    cluster = None
    if args.transport == "jetstream":
        _progress("starting two NATS sites joined by a gateway ...")
        cluster = Supercluster([SRC_SITE, DST_SITE], workdir=Path(tempfile.mkdtemp(prefix="prfaas-bench-kv-")))
        await asyncio.to_thread(cluster.start)
    ctx = multiprocessing.get_context("spawn")
    here, there = ctx.Pipe()
    url = cluster.url(DST_SITE) if cluster else ""
    child = ctx.Process(target=receiver_process, args=(there, args.transport, capacity, url, DST_SITE, INSTANCE))
    child.start()
    try:
        ready = await _recv(here, child, 60.0)
        return await _measure(args, specs, parts, payload_bytes, here, child, ready[1], cluster)
    finally:
        here.send(("stop",))
        await asyncio.to_thread(child.join, 30.0)
        if child.is_alive():
            child.terminate()
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)


async def _guard(child, coro):
    """Run ``coro`` while watching the receiver process (``TransferFailed`` if it dies meanwhile)."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.2)
        if done:
            return task.result()
        if not child.is_alive():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise TransferFailed(f"receiver process exited with code {child.exitcode}")


async def _recv(pipe, child, timeout_s: float):
    """The receiver process's next message (``TransferFailed`` if it dies or stays silent)."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(pipe.poll, 0.2):
        if not child.is_alive():
            raise TransferFailed(f"receiver process exited with code {child.exitcode}")
        if time.monotonic() > deadline:
            raise TransferFailed(f"receiver process silent for {timeout_s:.0f}s")
    return pipe.recv()


async def _measure(args, specs, parts, payload_bytes, pipe, child, port, cluster) -> dict:
    """Interleave ``--repeat`` rounds of baseline(s) and transfer; keep the best of each."""
    nc = await connect(cluster.url(SRC_SITE), name="bench-sender") if cluster else None
    try:
        if args.transport == "tcp":
            chunk = args.chunk or TcpConfig.chunk_bytes
            transport = TcpTransport(TcpConfig(connections=args.connections, chunk_bytes=chunk))
            dest = Destination(DST_SITE, INSTANCE, "127.0.0.1", port)
        else:
            chunk = args.chunk or JetStreamConfig.chunk_bytes
            transport = JetStreamTransport(nc, JetStreamConfig(chunk_bytes=chunk))
            dest = Destination(DST_SITE, INSTANCE)
        links = KvLinks(SRC_SITE, LinkConfig(default_budget_gbps=args.budget_gbps))
        sender = KvSender(transport, links)
        core_payload = _payload_view(parts) if cluster is not None else None
        raw: list[float] = []
        core: list[float] = []
        runs: list[tuple[SendReport, float]] = []
        for round_ in range(args.repeat):
            _progress(f"round {round_ + 1}/{args.repeat}: raw loopback baseline ...")
            raw.append(await asyncio.to_thread(raw_loopback_gbps, payload_bytes))
            if core_payload is not None:
                _progress("plain NATS publish/subscribe across the gateway ...")
                pipe.send(("core", "prfaas.bench.core", payload_bytes))
                core_chunk = sender.chunk_bytes(DST_SITE)
                # Credits in bytes like the stream's pull size: the server cuts off a client owed over 64 MB.
                window = max(1, min(JetStreamConfig.window, (32 << 20) // core_chunk))
                core.append(await _guard(child, core_nats_source(nc, "prfaas.bench.core", core_payload, core_chunk,
                                                                 window)))
                await _recv(pipe, child, 60.0)
            manifest = sender.manifest(transfer_id=f"bench-kv-{round_}", dst_site=DST_SITE, model="synthetic",
                                       block_size=64, num_tokens=parts[-1].array.shape[0], specs=specs)
            expected = part_checksums(parts, manifest.checksum)
            pipe.send(("wait", manifest.transfer_id))
            _progress(f"sending {payload_bytes / 2**20:.0f} MiB over {args.transport} ...")
            sampler = asyncio.create_task(_sample(links, payload_bytes))
            try:
                report = await _guard(child, sender.send(manifest, parts, dest))
            finally:
                sampler.cancel()
                samples = await sampler
            reply = await _recv(pipe, child, 60.0)
            if args.codec != "int8" and reply[1] != expected:
                raise TransferFailed("the receiver restored different bytes")
            runs.append((report, _max_window_gbps(samples)))
        report, max_window = max(runs, key=lambda run: run[0].goodput_gbps)
        verified = None if args.codec == "int8" else True  # lossy int8 cannot be compared byte for byte
        figures = _figures(args, report, verified)
        goodputs = [r.goodput_gbps for r, _ in runs]
        figures["goodput_runs_gbps"] = goodputs
        figures["raw_gbps"] = max(raw)
        figures["raw_runs_gbps"] = raw
        figures["ratio"] = figures["goodput_gbps"] / figures["raw_gbps"]
        figures["ratio_median"] = statistics.median(goodputs) / statistics.median(raw)
        if core:
            figures["nats_core_gbps"] = max(core)
            figures["nats_core_runs_gbps"] = core
            figures["jetstream_vs_core"] = figures["goodput_gbps"] / figures["nats_core_gbps"]
            figures["jetstream_vs_core_median"] = statistics.median(goodputs) / statistics.median(core)
        if args.budget_gbps > 0:
            figures["budget_gbps"] = args.budget_gbps
            figures["max_window_gbps"] = max(w for _, w in runs)
        return figures
    finally:
        if nc is not None:
            await nc.close()


def _payload_view(parts) -> memoryview:
    """Every part's bytes back to back (plain NATS carries them without structure)."""
    return memoryview(np.concatenate([p.array.reshape(-1).view(np.uint8) for p in parts]))


async def _sample(links: KvLinks, total_bytes: int) -> list[tuple[float, int]]:
    """(time, bytes acknowledged) every ``SAMPLE_S``; progress on stderr every second."""
    counters = links.link(DST_SITE).counters
    start_bytes = counters.acked_bytes_total  # the link's counters span every round
    samples: list[tuple[float, int]] = []
    last_print = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            samples.append((now, counters.acked_bytes_total))
            if now - last_print >= 1.0:
                last_print = now
                done = counters.acked_bytes_total - start_bytes
                _progress(f"  {done / 2**20:8.0f} / {total_bytes / 2**20:.0f} MiB acknowledged")
            await asyncio.sleep(SAMPLE_S)
    except asyncio.CancelledError:
        samples.append((time.monotonic(), counters.acked_bytes_total))
        return samples


def _max_window_gbps(samples: list[tuple[float, int]]) -> float:
    """Largest rate over any window of at least one second between samples."""
    best = 0.0
    j = 0
    for i, (t0, b0) in enumerate(samples):
        j = max(j, i + 1)
        while j < len(samples) and samples[j][0] - t0 < 1.0:
            j += 1
        if j == len(samples):
            break
        t1, b1 = samples[j]
        best = max(best, (b1 - b0) * 8 / (t1 - t0) / 1e9)
    return best


def _figures(args, report: SendReport, verified: bool | None) -> dict:
    return {
        "transport": args.transport,
        "size_bytes": report.payload_bytes,
        "codec": args.codec,
        "verified": verified,
        "goodput_gbps": report.goodput_gbps,
        "duration_s": report.duration_s,
        "wire_bytes": report.wire_bytes,
        "chunks_sent": report.chunks_sent,
        "chunks_resent": report.chunks_resent,
    }
