"""KV transfer between processes against a baseline of the same shape, and pacing accuracy.

A synthetic hybrid-model transfer (2 linear layers' fixed state, 8 attention layers' K/V sized to
``--size``) moves from a sender process to a receiver process; this process only orchestrates.
Unpaced, each of ``--repeat`` rounds runs the baseline then the transfer, and the figures are the
medians with their range and the median of the per-round ratios. Direct TCP's baseline has the
transport's shape: the same bytes striped in the same chunks over the same number of blocking
sockets between the two processes, received with ``recv_into`` into a touched buffer. JetStream's
is plain NATS publish/subscribe across the same gateway between the two sites, credit-windowed.

With ``--budget-gbps`` the site pair is paced: the bench reports the achieved rate and the largest
rate over any window of at least one second, read from the receiver's kernel byte counters (TCP;
JetStream: the sender's acknowledged bytes). ``--processes N`` runs N sender processes at the same
site sharing the pair budget over NATS: all sending at once, then one alone. ``--load N`` runs N
busy processes beside them. With ``--tls`` (direct TCP, unpaced) each round also sends the same
transfer over mutual TLS (a CA and two certificates made for the run) to a second listener of the
receiver process, and the bench reports TLS goodput and its ratio to the plain transfer of the round.
Each target is printed met or missed; the exit status is 1 on a miss.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from libs.bench.kv_procs import (
    DST_SITE,
    SRC_SITE,
    SenderSpec,
    busy_process,
    receiver_process,
    sender_process,
)
from libs.bench.targets import conclude
from libs.common.errors import ConfigError, TransferFailed
from libs.common.pki import CertificateAuthority
from libs.kvwire.js_send import JetStreamConfig
from libs.kvwire.tcp_send import TcpConfig
from libs.lab.servers import NatsServer, Supercluster

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
WINDOW_S = 1.0
MIN_SIZE = 2 << 20


@dataclass(frozen=True)
class Options:
    """The bench's validated arguments."""

    transport: str
    size_bytes: int
    budget_gbps: float
    connections: int
    chunk_bytes: int
    codec: str
    repeat: int
    processes: int
    load: int
    keep_logs: bool
    json: bool
    tls: bool


def parse_size(text: str, flag: str = "--size") -> int:
    """``512MiB``, ``1GB``, ``4096`` -> bytes (``ConfigError`` naming ``flag`` otherwise)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{flag}: {text!r} is not a size (e.g. 512MiB, 1GB, 4096)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _number(text: str, flag: str, kind: type, minimum: float) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not value >= minimum:  # also rejects nan
        raise ConfigError(f"{flag} must be >= {minimum}, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags (values are checked by ``options``, so a bad one is a one-line error)."""
    parser.add_argument("--transport", choices=("tcp", "jetstream"), default="tcp")
    parser.add_argument("--size", default="512MiB", help="bytes per transfer (512MiB)")
    parser.add_argument("--budget-gbps", default="0", help="pace the site pair (0: unpaced)")
    parser.add_argument("--connections", default=str(TcpConfig.connections), help="TCP connections per transfer")
    parser.add_argument("--chunk", default="", help="chunk size (the transport's default)")
    parser.add_argument("--codec", choices=("raw", "zstd", "int8"), default="raw", help="codec of attn_kv parts")
    parser.add_argument("--repeat", default="5", help="interleaved rounds; medians and ranges are reported")
    parser.add_argument("--processes", default="1", help="sender processes sharing the budget (needs a budget)")
    parser.add_argument("--load", default="0", help="busy processes running beside the bench (CPU contention)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory (kept anyway on failure)")
    parser.add_argument("--tls", action="store_true", help="also send each round over mutual TLS (tcp, unpaced)")


def options(args: argparse.Namespace) -> Options:
    """Validate the flags (``ConfigError`` naming the flag and the bad value)."""
    default_chunk = TcpConfig.chunk_bytes if args.transport == "tcp" else JetStreamConfig.chunk_bytes
    opts = Options(
        transport=args.transport,
        size_bytes=parse_size(args.size),
        budget_gbps=_number(args.budget_gbps, "--budget-gbps", float, 0.0),
        connections=_number(args.connections, "--connections", int, 1),
        chunk_bytes=parse_size(args.chunk, "--chunk") if args.chunk else default_chunk,
        codec=args.codec,
        repeat=_number(args.repeat, "--repeat", int, 1),
        processes=_number(args.processes, "--processes", int, 1),
        load=_number(args.load, "--load", int, 0),
        keep_logs=args.keep_logs,
        json=args.json,
        tls=args.tls,
    )
    if opts.size_bytes < MIN_SIZE:
        raise ConfigError(f"--size must be at least {MIN_SIZE >> 20} MiB, got {args.size}")
    if not 4096 <= opts.chunk_bytes <= 64 << 20:
        raise ConfigError(f"--chunk must be within [4KiB, 64MiB], got {args.chunk}")
    if opts.budget_gbps == float("inf"):
        raise ConfigError(f"--budget-gbps must be finite, got {args.budget_gbps}")
    if opts.tls and (opts.transport != "tcp" or opts.budget_gbps != 0):
        raise ConfigError("--tls needs --transport tcp and no --budget-gbps (it measures unpaced throughput)")
    if opts.processes > 1 and (opts.budget_gbps == 0 or opts.transport != "tcp"):
        raise ConfigError(f"--processes {opts.processes} needs --transport tcp and a --budget-gbps")
    return opts


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print its figures; 1 if a target was missed."""
    opts = options(args)
    workdir = Path(tempfile.mkdtemp(prefix="prfaas-bench-kv-"))
    ok = False
    try:
        figures = asyncio.run(_bench(opts, workdir))
        ok = True
    finally:
        if ok and not opts.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", file=sys.stderr)
    return conclude(args, figures, _text(figures))


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Child:
    """A spawned process driven over a pipe, watched while it is awaited."""

    def __init__(self, name: str, target, *args) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.pipe, there = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(there, *args), name=name)
        self.process.start()
        there.close()

    async def recv(self, timeout_s: float = 150.0):
        """The child's next message (``TransferFailed`` if it dies or stays silent)."""
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(self.pipe.poll, 0.2):
            if not self.process.is_alive():
                raise TransferFailed(f"{self.name} exited with code {self.process.exitcode}")
            if time.monotonic() > deadline:
                raise TransferFailed(f"{self.name} silent for {timeout_s:.0f}s")
        try:
            return self.pipe.recv()
        except EOFError:  # it closed its end: it is exiting
            await asyncio.to_thread(self.process.join, 5.0)
            raise TransferFailed(f"{self.name} exited with code {self.process.exitcode}") from None

    async def call(self, *command):
        """Send a command and return the reply."""
        self.pipe.send(command)
        return await self.recv()

    async def stop(self) -> None:
        """Ask it to stop; terminate it if it does not within 30 s."""
        with contextlib.suppress(OSError):
            self.pipe.send(("stop",))
        await asyncio.to_thread(self.process.join, 30.0)
        if self.process.is_alive():
            self.process.terminate()
            await asyncio.to_thread(self.process.join, 5.0)
        self.pipe.close()


async def _bench(opts: Options, workdir: Path) -> dict:
    nats_url = ""
    servers = None
    if opts.transport == "jetstream":
        _progress("starting two NATS sites joined by a gateway ...")
        servers = Supercluster([SRC_SITE, DST_SITE], workdir=workdir / "nats")
    elif opts.processes > 1:
        servers = NatsServer(name=SRC_SITE, workdir=workdir / "nats")
    children: list[Child] = []
    hogs = []
    try:
        if servers is not None:
            await asyncio.to_thread(servers.start)
        capacity = opts.processes * 2 * opts.size_bytes + (64 << 20)
        receiver_url = servers.url(DST_SITE) if isinstance(servers, Supercluster) else ""
        ca = CertificateAuthority(workdir / "pki") if opts.tls else None
        receiver = Child(
            "receiver process",
            receiver_process,
            opts.transport,
            capacity,
            receiver_url,
            workdir / "receiver.log",
            ca.issue("receiver", ["127.0.0.1"]) if ca is not None else None,
        )
        children.append(receiver)
        _, port, raw_port, tls_port = await receiver.recv()
        if isinstance(servers, Supercluster):
            nats_url = servers.url(SRC_SITE)
        elif servers is not None:
            nats_url = servers.url
        senders = []
        for i in range(opts.processes):
            spec = SenderSpec(
                opts.transport,
                opts.size_bytes,
                opts.codec,
                opts.budget_gbps,
                opts.connections,
                opts.chunk_bytes,
                nats_url,
                port,
                workdir / f"sender-{i}.log",
                ca.issue(f"sender-{i}", ["127.0.0.1"]) if ca is not None else None,
                tls_port,
            )
            senders.append(Child(f"sender process {i}", sender_process, spec))
            children.append(senders[-1])
        ready = [await s.recv() for s in senders]
        expected, chunk = ready[0][1], ready[0][2]
        ctx = multiprocessing.get_context("spawn")
        for _ in range(opts.load):
            hogs.append(ctx.Process(target=busy_process, args=(3600.0,), daemon=True))
            hogs[-1].start()
        rounds = []
        for r in range(opts.repeat):
            if opts.budget_gbps == 0:
                rounds.append(await _throughput_round(opts, r, receiver, senders[0], raw_port, chunk, expected))
            else:
                rounds.append(await _paced_round(opts, r, receiver, senders, expected))
        return _figures(opts, chunk, rounds)
    finally:
        for hog in hogs:
            hog.terminate()
        for child in children:
            await child.stop()
        if servers is not None:
            await asyncio.to_thread(servers.stop)


async def _transfer(
    opts, r: int, receiver: Child, senders: list[Child], expected, tag: str, tls: bool = False
) -> tuple[list, list]:
    """Every given sender sends one transfer at once (over mutual TLS if ``tls``); their reports and the receiver's
    wire samples (of its plain listener)."""
    ids = [f"bench-{r}-{tag}-{i}" for i in range(len(senders))]
    receiver.pipe.send(("wait", ids))
    for sender, tid in zip(senders, ids, strict=True):
        sender.pipe.send(("send", tid, tls))
    reports = [(await sender.recv())[1] for sender in senders]
    _, sums, samples = await receiver.recv()
    if opts.codec != "int8" and any(sums[tid] != expected for tid in ids):
        raise TransferFailed("the receiver restored different bytes")
    if opts.transport != "tcp":
        samples = reports[0]["acked_samples"]
    return reports, samples


async def _throughput_round(opts, r, receiver: Child, sender: Child, raw_port, chunk, expected) -> dict:
    """Baseline then transfer."""
    if opts.transport == "tcp":
        _progress(f"round {r + 1}/{opts.repeat}: raw sockets, {opts.connections} connections ...")
        await receiver.call("raw", opts.size_bytes, opts.connections)
        _, baseline = await sender.call("raw", raw_port, opts.connections, chunk)
        await receiver.recv()
    else:
        _progress(f"round {r + 1}/{opts.repeat}: plain NATS across the gateway ...")
        receiver.pipe.send(("core", "prfaas.bench.core", opts.size_bytes))
        # Credits in bytes like the stream's pull size: the server cuts off a client owed over 64 MB.
        window = max(1, min(JetStreamConfig.window, (32 << 20) // chunk))
        _, baseline = await sender.call("core", "prfaas.bench.core", chunk, window)
        await receiver.recv()
    _progress(f"round {r + 1}/{opts.repeat}: {opts.size_bytes / 2**20:.0f} MiB over kvwire {opts.transport} ...")
    reports, _ = await _transfer(opts, r, receiver, [sender], expected, "unpaced")
    result = {
        "baseline_gbps": baseline,
        "goodput_gbps": reports[0]["goodput_gbps"],
        "ratio": reports[0]["goodput_gbps"] / baseline,
        "chunks_resent": reports[0]["chunks_resent"],
    }
    if opts.tls:
        _progress(f"round {r + 1}/{opts.repeat}: the same over mutual TLS ...")
        reports, _ = await _transfer(opts, r, receiver, [sender], expected, "tls", tls=True)
        result["tls_goodput_gbps"] = reports[0]["goodput_gbps"]
        result["tls_vs_plain"] = reports[0]["goodput_gbps"] / result["goodput_gbps"]
    return result


async def _paced_round(opts, r, receiver: Child, senders: list[Child], expected) -> dict:
    """All senders at once (and, with several, the first one alone)."""
    budget = opts.budget_gbps
    _progress(
        f"round {r + 1}/{opts.repeat}: {len(senders)} x {opts.size_bytes / 2**20:.0f} MiB paced at {budget} Gbps ..."
    )
    reports, samples = await _transfer(opts, r, receiver, senders, expected, "together")
    span = (max(rep["started"] for rep in reports), min(rep["ended"] for rep in reports))
    result = {
        "achieved_gbps": mean_gbps(samples, *span) if opts.transport == "tcp" else reports[0]["goodput_gbps"],
        "max_window_gbps": max_window_gbps(samples),
        "process_gbps": [rep["goodput_gbps"] for rep in reports],
    }
    if len(senders) > 1:
        _progress(f"round {r + 1}/{opts.repeat}: sender 0 alone, the others idle ...")
        alone, samples = await _transfer(opts, r, receiver, senders[:1], expected, "alone")
        result["alone_gbps"] = mean_gbps(samples, alone[0]["started"], alone[0]["ended"])
        result["max_window_gbps"] = max(result["max_window_gbps"], max_window_gbps(samples))
    return result


def _at(samples: list[tuple[float, int]], t: float) -> float:
    """Bytes at time ``t``, interpolated between samples."""
    for (t0, b0), (t1, b1) in zip(samples, samples[1:], strict=False):
        if t0 <= t <= t1:
            return b0 + (b1 - b0) * (t - t0) / max(t1 - t0, 1e-9)
    return samples[0][1] if t < samples[0][0] else samples[-1][1]


def mean_gbps(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Rate between ``start`` and ``end`` (monotonic s)."""
    if len(samples) < 2 or end <= start:
        return 0.0
    return (_at(samples, end) - _at(samples, start)) * 8 / (end - start) / 1e9


def max_window_gbps(samples: list[tuple[float, int]]) -> float:
    """Largest rate over any window of at least ``WINDOW_S`` between samples."""
    best = 0.0
    j = 0
    for i, (t0, b0) in enumerate(samples):
        j = max(j, i + 1)
        while j < len(samples) and samples[j][0] - t0 < WINDOW_S:
            j += 1
        if j == len(samples):
            break
        t1, b1 = samples[j]
        best = max(best, (b1 - b0) * 8 / (t1 - t0) / 1e9)
    return best


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _figures(opts: Options, chunk: int, rounds: list[dict]) -> dict:
    figures = {
        "transport": opts.transport,
        "size_bytes": opts.size_bytes,
        "codec": opts.codec,
        "chunk_bytes": chunk,
        "connections": opts.connections,
        "processes": opts.processes,
        "load": opts.load,
        "rounds": rounds,
        "verified": opts.codec != "int8",
    }
    if opts.budget_gbps == 0:
        name = "tcp_vs_raw_sockets" if opts.transport == "tcp" else "jetstream_vs_core_nats"
        figures["goodput_gbps"] = _spread([r["goodput_gbps"] for r in rounds])
        figures["baseline_gbps"] = _spread([r["baseline_gbps"] for r in rounds])
        figures[name] = _spread([r["ratio"] for r in rounds])
        if opts.tls:
            figures["tls_goodput_gbps"] = _spread([r["tls_goodput_gbps"] for r in rounds])
            figures["tls_vs_plain"] = _spread([r["tls_vs_plain"] for r in rounds])
    else:
        budget = opts.budget_gbps
        figures["budget_gbps"] = budget
        figures["achieved_vs_budget"] = _spread([r["achieved_gbps"] / budget for r in rounds])
        max_window = max(r["max_window_gbps"] for r in rounds)
        if max_window > 0:  # 0: no transfer lasted a whole window, so there is no window to judge
            figures["max_window_vs_budget"] = max_window / budget
        if opts.processes > 1:
            figures["process_share_vs_budget"] = _spread([g / budget for r in rounds for g in r["process_gbps"]])
            figures["alone_vs_budget"] = _spread([r["alone_gbps"] / budget for r in rounds])
    return figures


def _range(s: dict, fmt: str = ".2f") -> str:
    return f"median {s['median']:{fmt}} (range {s['min']:{fmt}}-{s['max']:{fmt}})"


def _text(f: dict) -> str:
    lines = [
        f"transport          {f['transport']}  ({f['size_bytes'] / 2**20:.0f} MiB per transfer, codec {f['codec']}, "
        f"chunks {f['chunk_bytes'] >> 10} KiB, verified {f['verified']}, {len(f['rounds'])} rounds"
        + (f", {f['load']} busy processes beside" if f["load"] else "")
        + ")"
    ]
    if "budget_gbps" not in f:
        baseline = (
            f"raw sockets ({f['connections']} connections, two processes)"
            if f["transport"] == "tcp"
            else "plain NATS across the gateway"
        )
        name = "tcp_vs_raw_sockets" if f["transport"] == "tcp" else "jetstream_vs_core_nats"
        lines += [
            f"baseline           {_range(f['baseline_gbps'])} Gbps  {baseline}",
            f"kvwire {f['transport']:<11} {_range(f['goodput_gbps'])} Gbps",
            f"{name:<18} {_range(f[name])}  per round",
        ]
        if "tls_vs_plain" in f:
            lines += [
                f"kvwire tcp + TLS   {_range(f['tls_goodput_gbps'])} Gbps  (mutual TLS, same transfer)",
                f"tls_vs_plain       {_range(f['tls_vs_plain'])}  per round",
            ]
    else:
        together = " (all senders together)" if f["processes"] > 1 else ""
        source = "receiver's kernel byte counts" if f["transport"] == "tcp" else "sender's acknowledged bytes"
        lines += [
            f"budget             {f['budget_gbps']} Gbps shared by {f['processes']} sender process(es)",
            f"achieved_vs_budget {_range(f['achieved_vs_budget'], '.3f')}{together}",
            f"max_window_vs_budget {f['max_window_vs_budget']:.3f}  (largest rate over any {WINDOW_S:.0f} s "
            f"window, all rounds, from the {source})"
            if "max_window_vs_budget" in f
            else f"max_window_vs_budget: no transfer lasted {WINDOW_S:.0f} s (give a larger --size)",
        ]
        if "alone_vs_budget" in f:
            lines += [
                f"process_share_vs_budget {_range(f['process_share_vs_budget'], '.3f')}  (each sender's goodput)",
                f"alone_vs_budget    {_range(f['alone_vs_budget'], '.3f')}  (one sender, the others idle)",
            ]
    return "\n".join(lines)
