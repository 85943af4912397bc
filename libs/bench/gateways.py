"""Prefill and decode gateways across two sites, as real processes: tokens, timings, overlap, bytes, overhead.

Starts a two-site NATS supercluster, prefill gateways at ``dc-prfaas`` and decode gateways at
``dc-pd`` (``python -m services.<gateway>``), and a router stand-in at the decode site that sends
both legs of each request (``DecodeJob`` for a reservation, then ``PrefillJob``). Figures:

- ``reference.tcp`` / ``reference.jetstream``: reference-model tokens compared with monolithic
  ``libs.engine.generate.generate`` on the same prompt, and where the time to first token went;
- ``pipelining``: simulated chips with the link paced so the transfer takes about as long as the
  prefill. Each repeat sends the same job twice, interleaved: to a prefill gateway streaming each
  layer as it is done, and to one with layer-wise streaming off (``PREFILL_GATEWAY_LAYERWISE=false``:
  the whole state leaves after the prefill), the baseline. ``transfer_exposed_s`` = time to first
  token minus the prefill and the modelled first decode step; ``exposed_fraction`` = layer-wise
  over no-overlap, per repeat (target <= 0.25). ``receiver_vs_budget``: the rate at which the
  no-overlap transfer reached the receiver (its bytes past the pacer's initial burst over the
  receiver's own transfer time less the prefill), over the budget (target 0.9 .. 1.1);
- ``prefix_reuse``: a second prompt sharing 80% of the first sends only the missing ``attn_kv``
  blocks plus the linear states (target ``bytes_second`` <= 0.3 x ``bytes_first``), same tokens;
- ``overhead``: job to first token minus the simulated backends' own predicted times (the modelled
  prefill and first decode step), over sequential requests (``overhead_p50_ms``, target <= 5 ms);
  what makes it up is reported beside it (the prefill as measured, the transfer left exposed after
  it, the decode side's first step) and in NATS round trips between the sites (measured first).

Every figure is the median over ``--repeats`` requests with its range.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from libs.bench.targets import conclude
from libs.common import subjects
from libs.common.bus import connect, settle
from libs.common.errors import ConfigError, UpstreamTimeout
from libs.common.messages import (
    Codec,
    DecodeFinished,
    DecodeJob,
    DecodeReservation,
    ErrorReply,
    InstanceLoad,
    PrefillAccepted,
    PrefillFinished,
    PrefillJob,
    Sampling,
    TokenChunk,
    TokenLogprob,
    Transport,
    decode_stream_decoder,
    encode,
    instance_load_decoder,
    link_share_announce_decoder,
    prefill_status_decoder,
)
from libs.engine.generate import generate
from libs.engine.model import ReferenceModel
from libs.engine.profiles import hardware_profile, model_profile
from libs.engine.tokenizer import ByteTokenizer
from libs.kvwire.pacing import TokenBucket
from libs.lab.servers import Supercluster
from services.decode_gateway.client import DecodeGatewayClient
from services.prefill_gateway.client import PrefillGatewayClient

PREFILL_SITE, DECODE_SITE = "dc-prfaas", "dc-pd"
CLUSTER = "prfaas"
GREEDY = Sampling()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: be killed when the parent dies (Linux), so no gateway outlives its starter."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class GatewayProcess:
    """A gateway run as ``python -m services.<kind>`` with env settings; ready once it heartbeats."""

    def __init__(self, kind: str, env: Mapping[str, str], log_path: Path) -> None:
        if kind not in ("prefill_gateway", "decode_gateway"):
            raise ValueError(f"unknown gateway kind {kind!r}")
        self.kind = kind
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """Process id (the process must have been started)."""
        if self.proc is None:
            raise RuntimeError("gateway not started")
        return self.proc.pid

    def spawn(self) -> GatewayProcess:
        """Start the process (from the thread that outlives it: the child dies with that thread)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.kind}"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        return self

    async def ready(self, nc: NatsClient, site: str, instance: str, timeout_s: float = 60.0) -> InstanceLoad:
        """The first heartbeat of ``site/instance`` (``nc`` is a connection at ``site``); kills the process on failure."""
        sub = await nc.subscribe(subjects.load(site, instance))
        try:
            end = time.monotonic() + timeout_s
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise UpstreamTimeout(f"{self.kind} exited with {code}:\n{self.log_tail()}")
                if time.monotonic() > end:
                    raise UpstreamTimeout(
                        f"{self.kind} {site}/{instance} silent after {timeout_s:.0f}s:\n{self.log_tail()}"
                    )
                with contextlib.suppress(nats.errors.TimeoutError):
                    return instance_load_decoder.decode((await sub.next_msg(timeout=0.2)).data)
        except BaseException:
            self.kill()
            raise
        finally:
            await sub.unsubscribe()

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the process's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap (idempotent)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM (graceful drain), wait, then kill; the exit code (None if it had not started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def gateway_env(kind: str, nats_url: str, **settings: object) -> dict[str, str]:
    """``PREFILL_GATEWAY_*`` / ``DECODE_GATEWAY_*`` variables from keyword settings (``queue_limit=4``)."""
    prefix = {"prefill_gateway": "PREFILL_GATEWAY_", "decode_gateway": "DECODE_GATEWAY_"}[kind]
    env = {f"{prefix}NATS_URL": nats_url, f"{prefix}LOG_LEVEL": "WARNING"}
    env.update({f"{prefix}{key.upper()}": str(value) for key, value in settings.items()})
    return env


@dataclass
class Outcome:
    """What came back for one request, with times from the job's start on the caller's clock."""

    request_id: str
    reservation: DecodeReservation
    accepted: PrefillAccepted | None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the sampling asks for them
    final: DecodeFinished | ErrorReply | None = None
    status: PrefillFinished | ErrorReply | None = None
    first_token_s: float | None = None
    end_s: float = 0.0  # the decode side's last message
    status_s: float = 0.0  # the prefill side's status


class Caller:
    """A router stand-in at the decode site: sends both legs of each request and collects what comes back."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        prefill_site: str = PREFILL_SITE,
        cluster: str = CLUSTER,
        decode_site: str = DECODE_SITE,
        timeout_s: float = 5.0,
    ) -> None:
        self.nc = nc
        self.prefill_site = prefill_site
        self.cluster = cluster
        self.decode_site = decode_site
        self.decode = DecodeGatewayClient(nc, timeout_s)
        self.prefill = PrefillGatewayClient(nc, timeout_s)
        self.prefix = nc.new_inbox()
        self._streams: dict[str, asyncio.Queue] = {}
        self._sub = None

    async def __aenter__(self) -> Caller:
        self._sub = await self.nc.subscribe(f"{self.prefix}.>", cb=self._on_message)
        await settle(self.nc)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    async def _on_message(self, msg: Msg) -> None:
        kind, _, request_id = msg.subject[len(self.prefix) + 1 :].partition(".")
        queue = self._streams.get(request_id)
        if queue is not None:
            decoder = decode_stream_decoder if kind == "reply" else prefill_status_decoder
            queue.put_nowait((time.monotonic(), kind, decoder.decode(msg.data)))

    async def reachable(self, prefill_nc: NatsClient, timeout_s: float = 30.0) -> None:
        """Wait until status messages from the prefill site and prefill jobs from here get through."""
        probe = f"probe{uuid.uuid4().hex[:8]}"
        queue = self._streams[probe] = asyncio.Queue()
        subject = subjects.prefill_jobs(self.prefill_site, self.cluster)
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    await prefill_nc.publish(
                        f"{self.prefix}.status.{probe}", encode(ErrorReply(code="probe", message=""))
                    )
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await queue.get()
                            break
                while True:
                    with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                        await self.nc.request(subject, b"", timeout=0.5)  # a bad_request answer: the path is up
                        return
                    await asyncio.sleep(0.1)
        finally:
            del self._streams[probe]

    async def request(
        self,
        prompt: list[int],
        decode_instance: str,
        *,
        model: str,
        max_tokens: int = 16,
        sampling: Sampling = GREEDY,
        transport: Transport = "tcp",
        codec: Codec | None = None,
        lease_s: float = 0.0,
        timeout_s: float = 60.0,
        prefill_instance: str | None = None,
        send_prefill: bool = True,
        wait_status: bool = True,
        wait_final: bool = True,
        request_id: str = "",
        first_token: asyncio.Event | None = None,
    ) -> Outcome:
        """Reserve at the decode instance, hand the prefill to the cluster, collect tokens and both outcomes.

        ``first_token`` is set when the first tokens arrive. The outcome is complete with the decode
        side's last message (unless not ``wait_final``) and the prefill's status (unless not ``wait_status``).
        """
        request_id = request_id or uuid.uuid4().hex[:16]
        queue = self._streams[request_id] = asyncio.Queue()
        start = time.monotonic()
        try:
            reservation = await self.decode.reserve(
                self.decode_site,
                decode_instance,
                DecodeJob(
                    request_id=request_id,
                    transfer_id=f"t{request_id}",
                    model=model,
                    prompt_tokens=prompt,
                    max_tokens=max_tokens,
                    reply_subject=f"{self.prefix}.reply.{request_id}",
                    prefill_site=self.prefill_site,
                    transport=transport,
                    sampling=sampling,
                    timeout_s=timeout_s,
                    lease_s=lease_s,
                ),
            )
            accepted = None
            if send_prefill:
                accepted = await self.prefill.submit(
                    self.prefill_site,
                    self.cluster,
                    PrefillJob(
                        request_id=request_id,
                        transfer_id=f"t{request_id}",
                        model=model,
                        prompt_tokens=prompt,
                        destination=reservation.destination,
                        skip_blocks=reservation.held_blocks,
                        status_subject=f"{self.prefix}.status.{request_id}",
                        codec=codec,
                        timeout_s=timeout_s,
                    ),
                    instance=prefill_instance,
                )
            outcome = Outcome(request_id, reservation, accepted)
            async with asyncio.timeout(timeout_s + 10):
                while (wait_final and outcome.final is None) or (
                    send_prefill and wait_status and outcome.status is None
                ):
                    at, kind, msg = await queue.get()
                    if kind == "status":
                        outcome.status = msg
                        outcome.status_s = at - start
                    elif isinstance(msg, TokenChunk):
                        outcome.first_token_s = outcome.first_token_s or at - start
                        outcome.tokens += msg.token_ids
                        outcome.logprobs += msg.logprobs
                        if first_token is not None:
                            first_token.set()
                    else:
                        outcome.final = msg
                        outcome.end_s = at - start
            return outcome
        finally:
            del self._streams[request_id]


# --- the benchmark -------------------------------------------------------------------------------

PIPELINE_MODEL = "kimi-linear-1t"  # the paper's 60-layer hybrid: each layer's parts go as soon as it is done
PIPELINE_BYTE_SCALE = 1e-2
OVERHEAD_MODEL = "reference"  # 8 layers, ~2 ms prefills, 5 ms steps: what is left is the gateways' own cost
_TEXT = "Prefill in one datacenter, decode in another: the KV cache of a hybrid model crosses the WAN. "


def _figure(values: list[float]) -> dict[str, float]:
    """Median with its range."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _prompt(tag: str, tokens: int) -> list[int]:
    """A reference-model prompt of exactly ``tokens`` byte tokens, distinct per ``tag`` from its first block."""
    text = f"[{tag}] " + _TEXT * (tokens // len(_TEXT) + 2)
    return ByteTokenizer().encode(text)[:tokens]


def _step_s(model: str, hardware: str) -> float:
    """Modelled seconds of a decode step of one sequence (time scale 1)."""
    return model_profile(model).decode_step_s(1, hardware_profile(hardware))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--repeats", type=int, default=5, help="requests per case (medians with their range)")
    parser.add_argument("--overhead-requests", type=int, default=50, help="sequential requests of the overhead case")
    parser.add_argument("--ref-tokens", type=int, default=1024, help="prompt tokens of the reference cases")
    parser.add_argument("--prefix-tokens", type=int, default=2048, help="prompt tokens of the prefix-reuse case")
    parser.add_argument("--paced-tokens", type=int, default=8192, help="prompt tokens of the pipelining case")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory (kept anyway on failure)")
    parser.add_argument(
        "--pool-rtt-ms", default="20,80", help="RTTs of the pool case (libs/bench/gateways_pool.py); '' skips it"
    )
    parser.add_argument("--pool-tokens", type=int, default=16384, help="prompt tokens of the pool case")
    parser.add_argument("--pool-gbps", type=float, default=2.5, help="relay bandwidth and pacing budget, pool case")
    parser.add_argument(
        "--pool-byte-scale",
        type=float,
        default=0.25,
        help="KV bytes of the pool case (0.25 at 2.5 Gbps: 10 Gbps's time)",
    )


class _Fleet:
    """The bench's gateway processes (all stopped at the end)."""

    def __init__(self, cluster: Supercluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.procs: list[tuple[GatewayProcess, str, str]] = []

    def add(self, kind: str, site: str, name: str, **settings: object) -> None:
        """Plan one gateway process (``name``: the instance whose heartbeat says it is ready)."""
        env = gateway_env(kind, self.cluster.url(site), site=site, log_level="INFO", **settings)
        self.procs.append((GatewayProcess(kind, env, self.workdir / f"{kind}-{name}.log"), site, name))

    async def start(self, ncs: dict[str, NatsClient]) -> None:
        """Spawn every process and wait until each heartbeats."""
        for proc, _, _ in self.procs:
            proc.spawn()
        await asyncio.gather(*[proc.ready(ncs[site], site, instance) for proc, site, instance in self.procs])

    def stop(self) -> None:
        """SIGTERM every process, then SIGKILL the slow ones."""
        for proc, _, _ in self.procs:
            proc.stop()


def _finished(outcome: Outcome) -> tuple[DecodeFinished, PrefillFinished]:
    """The two final messages of a successful request (``UpstreamTimeout`` naming what failed otherwise)."""
    if not isinstance(outcome.final, DecodeFinished) or not isinstance(outcome.status, PrefillFinished):
        raise UpstreamTimeout(
            f"request {outcome.request_id} failed: decode {outcome.final!r}, prefill {outcome.status!r}"
        )
    if outcome.first_token_s is None:
        raise UpstreamTimeout(f"request {outcome.request_id} finished without a token chunk: {outcome.final!r}")
    return outcome.final, outcome.status


async def _reference_case(caller: Caller, args: argparse.Namespace, transport: Transport) -> dict:
    """Reference tokens across the sites vs monolithic generation, and where the time to first token went."""
    model, rows, identical = ReferenceModel(), [], True
    for i in range(args.repeats):
        prompt = _prompt(f"{transport}-{i}", args.ref_tokens)
        out = await caller.request(
            prompt,
            "ref-d0",
            model="reference",
            max_tokens=args.max_tokens,
            transport=transport,
            prefill_instance="ref-p0",
        )
        final, status = _finished(out)
        identical &= out.tokens == await asyncio.to_thread(generate, model, prompt, args.max_tokens, GREEDY)
        t = final.timings
        rows.append(
            (
                out.first_token_s,
                status.queue_s,
                status.prefill_s,
                status.transfer_s,
                t.first_token_s - t.kv_wait_s - t.transfer_s,
            )
        )
    names = ("ttft_s", "queue_s", "prefill_s", "transfer_s", "decode_first_token_s")
    return {"tokens_identical": identical, **{n: _figure([r[i] for r in rows]) for i, n in enumerate(names)}}


async def _until_link_idle(nc: NatsClient, src: str, dst: str, timeout_s: float = 10.0, silent_s: float = 1.0) -> None:
    """Wait until every process sharing the ``src`` -> ``dst`` budget announces no demand (``nc`` at ``src``).

    A process that just finished a transfer keeps its share until it announces idle; a transfer
    starting at another process before that would not get the whole budget. Idle: two of the
    announcement periods heard and every announcer's last word was no demand, or ``silent_s``
    without any announcement (no process is using the pair).
    """
    sub = await nc.subscribe(subjects.link_share(src, dst))
    demand: dict[str, float] = {}
    start, heard_s = time.monotonic(), 0.0
    try:
        while time.monotonic() - start < timeout_s:
            try:
                announce = link_share_announce_decoder.decode((await sub.next_msg(timeout=silent_s)).data)
            except nats.errors.TimeoutError:
                return
            demand[announce.process] = announce.demand_gbps
            heard_s = max(heard_s, 2 * announce.interval_s)
            if time.monotonic() - start >= heard_s and not any(demand.values()):
                return
        raise UpstreamTimeout(f"the {src} -> {dst} link did not go idle within {timeout_s:.0f}s: {demand}")
    finally:
        await sub.unsubscribe()


async def _paced_request(
    caller: Caller, prefill_nc: NatsClient, prompt: list[int], instance: str, step_s: float, budget_gbps: float
) -> dict:
    """One job on the paced link once it is idle: its prefill, exposed transfer and the receiver's rate."""
    await _until_link_idle(prefill_nc, PREFILL_SITE, DECODE_SITE)
    out = await caller.request(prompt, "sim-d0", model=PIPELINE_MODEL, max_tokens=2, prefill_instance=instance)
    final, status = _finished(out)
    receiving_s = final.timings.transfer_s - status.prefill_s  # manifest at compute start -> last part verified
    paced_bytes = max(
        status.sent_bytes - TokenBucket(budget_gbps).burst_bytes, 0
    )  # the pacer lets its burst out at once
    return {
        "prefill_s": status.prefill_s,
        "ttft_s": out.first_token_s,
        "transfer_exposed_s": out.first_token_s - status.prefill_s - step_s,
        "transfer_wall_s": status.transfer_s,
        "sent_bytes": status.sent_bytes,
        "receiver_gbps": paced_bytes * 8 / receiving_s / 1e9 if receiving_s > 0 else 0.0,
    }


async def _pipelining_case(
    caller: Caller, prefill_nc: NatsClient, args: argparse.Namespace, budget_gbps: float
) -> dict:
    """The same job with and without layer-wise streaming, interleaved: how much of the transfer each leaves exposed."""
    step_s = _step_s(PIPELINE_MODEL, "h20")
    layerwise, no_overlap = [], []
    for i in range(args.repeats):
        prompt = [i + 1] + list(range(args.paced_tokens - 1))
        layerwise.append(await _paced_request(caller, prefill_nc, prompt, "paced-p0", step_s, budget_gbps))
        other = [args.repeats + i + 1, *prompt[1:]]  # its own first block: nothing of it is cached anywhere
        no_overlap.append(await _paced_request(caller, prefill_nc, other, "flat-p0", step_s, budget_gbps))
    keys = ("prefill_s", "ttft_s", "transfer_exposed_s", "transfer_wall_s")
    return {
        "layerwise": {k: _figure([r[k] for r in layerwise]) for k in keys},
        "no_overlap": {k: _figure([r[k] for r in no_overlap]) for k in (*keys, "receiver_gbps")},
        "exposed_fraction": _figure(
            [a["transfer_exposed_s"] / b["transfer_exposed_s"] for a, b in zip(layerwise, no_overlap, strict=True)]
        ),
        "receiver_vs_budget": _figure([r["receiver_gbps"] / budget_gbps for r in no_overlap]),
        "bytes_at_budget_s": statistics.median(r["sent_bytes"] for r in no_overlap) * 8 / (budget_gbps * 1e9),
        "budget_gbps": budget_gbps,
    }


async def _prefix_case(caller: Caller, args: argparse.Namespace) -> dict:
    """A prompt, then one sharing its first 80%: the second sends only what the decode side lacks."""
    model, rows = ReferenceModel(), []
    for i in range(args.repeats):
        first = _prompt(f"prefix-{i}", args.prefix_tokens)
        shared = int(0.8 * len(first))
        second = first[:shared] + _prompt(f"other ending {i}", len(first) - shared)[1:] + [10]
        outs = [
            await caller.request(p, "ref-d0", model="reference", max_tokens=args.max_tokens, prefill_instance="ref-p0")
            for p in (first, second)
        ]
        identical = all(
            [
                o.tokens == await asyncio.to_thread(generate, model, p, args.max_tokens, GREEDY)
                for o, p in zip(outs, (first, second), strict=True)
            ]
        )
        (_, one), (_, two) = _finished(outs[0]), _finished(outs[1])
        rows.append((one.sent_bytes, two.sent_bytes, identical, outs[1].reservation.held_blocks))
    return {
        "bytes_first": _figure([r[0] for r in rows]),
        "bytes_second": _figure([r[1] for r in rows]),
        "bytes_fraction": _figure([r[1] / r[0] for r in rows]),
        "held_blocks": _figure([r[3] for r in rows]),
        "tokens_identical": all(r[2] for r in rows),
    }


async def _overhead_case(caller: Caller, args: argparse.Namespace, rtt_ms: float) -> dict:
    """Job to first token over the simulated backends' own predicted times (modelled prefill and first step).

    What it is made of is reported beside it: the prefill as the prefill gateway measured it (the
    backend's sleeps overshoot), the transfer it left exposed (on loopback mostly kvwire's own
    acknowledgements and end marker) and the decode side's first step as it measured it.
    """
    step_s = _step_s(OVERHEAD_MODEL, "h20")
    modelled_prefill_s = model_profile(OVERHEAD_MODEL).prefill_time_s(256, hardware_profile("h200"))
    rows = []
    for i in range(args.overhead_requests):
        prompt = [(i * 7 + j) % 250 for j in range(256)]
        out = await caller.request(prompt, "ovh-d0", model=OVERHEAD_MODEL, max_tokens=1, prefill_instance="ovh-p0")
        final, status = _finished(out)
        ttft = out.first_token_s
        rows.append(
            (
                ttft - modelled_prefill_s - step_s,
                ttft,
                status.prefill_s,
                status.transfer_exposed_s,
                final.timings.first_step_s,
            )
        )
    names = ("overhead_ms", "ttft_ms", "prefill_ms", "transfer_exposed_ms", "decode_first_step_ms")
    figures = {n: _figure([r[i] * 1e3 for r in rows]) for i, n in enumerate(names)}
    return {
        **figures,
        "overhead_rtts": figures["overhead_ms"]["median"] / rtt_ms,
        "modelled_prefill_ms": modelled_prefill_s * 1e3,
        "modelled_step_ms": step_s * 1e3,
        "requests": len(rows),
    }


async def _nats_rtt_ms(caller_nc: NatsClient, prefill_nc: NatsClient, n: int = 50) -> dict[str, float]:
    """Baseline: request/reply round trips from the decode site to an echo at the prefill site."""
    subject = f"{caller_nc.new_inbox()}.echo"

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    sub = await prefill_nc.subscribe(subject, cb=echo)
    try:
        for _ in range(20):
            with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                await caller_nc.request(subject, b"x", timeout=0.5)
                break
            await asyncio.sleep(0.1)
        rtts = []
        for _ in range(n):
            start = time.perf_counter()
            await caller_nc.request(subject, b"x" * 64, timeout=2)
            rtts.append((time.perf_counter() - start) * 1e3)
        return _figure(rtts)
    finally:
        await sub.unsubscribe()


def _pool(args: argparse.Namespace):
    """The pool case's module (imported only when ``--pool-rtt-ms`` names RTTs, which it checks), else None."""
    if not args.pool_rtt_ms.strip():
        return None
    from libs.bench import gateways_pool

    gateways_pool.rtts_ms(args)
    return gateways_pool


async def _bench(args: argparse.Namespace, workdir: Path) -> dict:
    cluster = Supercluster([PREFILL_SITE, DECODE_SITE], workdir=workdir / "nats").start()
    fleet = _Fleet(cluster, workdir)
    profile = model_profile(PIPELINE_MODEL)
    paced_prefill_s = profile.prefill_time_s(args.paced_tokens, hardware_profile("h200"))
    budget_gbps = round(profile.kv_bytes(args.paced_tokens) * PIPELINE_BYTE_SCALE * 8 / paced_prefill_s / 1e9, 4)
    fleet.add("prefill_gateway", PREFILL_SITE, "ref-p0", cluster="bench", instances="ref-p0")
    fleet.add("decode_gateway", DECODE_SITE, "ref-d0", instance="ref-d0")
    pipeline = {"model": PIPELINE_MODEL, "byte_scale": PIPELINE_BYTE_SCALE}
    for name, layerwise in (("paced-p0", True), ("flat-p0", False)):  # the same chip, with and without overlap
        fleet.add(
            "prefill_gateway",
            PREFILL_SITE,
            name,
            cluster="bench",
            instances=name,
            backend="simulated:h200",
            budgets=f"{DECODE_SITE}={budget_gbps}",
            layerwise=str(layerwise).lower(),
            **pipeline,
        )
    fleet.add("decode_gateway", DECODE_SITE, "sim-d0", instance="sim-d0", backend="simulated:h20", **pipeline)
    overhead = {"model": OVERHEAD_MODEL}
    fleet.add(
        "prefill_gateway",
        PREFILL_SITE,
        "ovh-p0",
        cluster="bench",
        instances="ovh-p0",
        backend="simulated:h200",
        **overhead,
    )
    fleet.add("decode_gateway", DECODE_SITE, "ovh-d0", instance="ovh-d0", backend="simulated:h20", **overhead)
    pool = _pool(args)
    pool_relay = pool.plan(fleet, args) if pool else None
    relays = contextlib.ExitStack()
    ncs = {}
    try:
        if pool_relay is not None:
            relays.enter_context(pool_relay)
        ncs = {site: await connect(cluster.url(site), name=f"bench-{site}") for site in cluster.sites}
        await fleet.start(ncs)
        async with Caller(ncs[DECODE_SITE], cluster="bench", timeout_s=10.0) as caller:
            await caller.reachable(ncs[PREFILL_SITE])
            figures: dict = {"nats_rtt_ms": await _nats_rtt_ms(ncs[DECODE_SITE], ncs[PREFILL_SITE])}
            figures["reference"] = {t: await _reference_case(caller, args, t) for t in ("tcp", "jetstream")}
            figures["pipelining"] = await _pipelining_case(caller, ncs[PREFILL_SITE], args, budget_gbps)
            figures["prefix_reuse"] = await _prefix_case(caller, args)
            figures["overhead"] = await _overhead_case(caller, args, figures["nats_rtt_ms"]["median"])
            if pool_relay is not None:
                figures |= await pool.pool_case(caller, pool_relay, args)
        figures["overhead_p50_ms"] = figures["overhead"]["overhead_ms"]["median"]
        figures["tokens_identical"] = (
            all(figures["reference"][t]["tokens_identical"] for t in ("tcp", "jetstream"))
            and figures["prefix_reuse"]["tokens_identical"]
        )
        return figures
    finally:
        for nc in ncs.values():
            await nc.close()
        fleet.stop()
        relays.close()
        cluster.stop()


def _line(name: str, f: dict[str, float], unit: str = "", scale: float = 1.0) -> str:
    return f"  {name:30s} {f['median'] * scale:10.4g}{unit}  [{f['min'] * scale:.4g} .. {f['max'] * scale:.4g}]"


def _text(args: argparse.Namespace, figures: dict) -> str:
    """The figures for people (the verdicts follow)."""
    rows = [
        f"medians of {args.repeats} requests per case [range]; NATS round trip across the sites "
        f"{figures['nats_rtt_ms']['median']:.2f} ms"
    ]
    for transport, f in figures["reference"].items():
        rows.append(f"reference.{transport}: tokens identical {f['tokens_identical']}")
        rows += [
            _line(key, f[key], " s") for key in ("ttft_s", "queue_s", "prefill_s", "transfer_s", "decode_first_token_s")
        ]
    p = figures["pipelining"]
    rows.append(
        f"pipelining ({PIPELINE_MODEL}, link paced at {p['budget_gbps']} Gbps, {p['bytes_at_budget_s']:.3f} s of "
        f"bytes at the budget): exposed with / without layer-wise streaming {p['exposed_fraction']['median']:.3f}, "
        f"no-overlap receiver at {p['receiver_vs_budget']['median']:.3f} of the budget"
    )
    for mode in ("layerwise", "no_overlap"):
        rows += [_line(f"{mode}.{key}", f, " s") for key, f in p[mode].items() if key != "receiver_gbps"]
    rows.append(_line("no_overlap.receiver_gbps", p["no_overlap"]["receiver_gbps"], " Gbps"))
    r = figures["prefix_reuse"]
    rows.append(
        f"prefix_reuse (80% shared): bytes second / first {r['bytes_fraction']['median']:.3f}, "
        f"tokens identical {r['tokens_identical']}"
    )
    rows += [_line(key, r[key]) for key in ("bytes_first", "bytes_second", "held_blocks")]
    o = figures["overhead"]
    rows.append(
        f"overhead ({o['requests']} sequential requests, {OVERHEAD_MODEL} profile): TTFT over the modelled "
        f"prefill {o['modelled_prefill_ms']:.2f} ms and first step {o['modelled_step_ms']:.2f} ms: p50 "
        f"{figures['overhead_p50_ms']:.2f} ms = {o['overhead_rtts']:.1f} NATS round trips"
    )
    rows += [
        _line(key, o[key], " ms")
        for key in ("overhead_ms", "ttft_ms", "prefill_ms", "transfer_exposed_ms", "decode_first_step_ms")
    ]
    if "warm_pool" in figures:
        rows += _pool(args).text(figures)
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print its figures with their verdicts; exit status 1 if a target was missed."""
    if min(args.repeats, args.overhead_requests, args.max_tokens) < 1 or min(args.ref_tokens, args.prefix_tokens) < 128:
        raise ConfigError("--repeats, --overhead-requests and --max-tokens must be >= 1; prompts >= 128 tokens")
    _pool(args)  # its flags are checked before anything starts
    work = Path(tempfile.mkdtemp(prefix="prfaas-bench-gateways-"))
    try:
        figures = asyncio.run(_bench(args, work))
    except BaseException:
        print(f"gateway logs kept in {work}", file=sys.stderr)
        raise
    if args.keep_logs:
        print(f"gateway logs kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return conclude(args, figures, _text(args, figures))
