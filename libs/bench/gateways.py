"""Prefill and decode gateways across two sites, as real processes: tokens, timings, overlap, bytes, overhead.

Starts a two-site NATS supercluster, prefill gateways at ``dc-prfaas`` and decode gateways at
``dc-pd`` (``python -m services.<gateway>``), and a router stand-in at the decode site that sends
both legs of each request (``DecodeJob`` for a reservation, then ``PrefillJob``). Figures:

- ``reference.tcp`` / ``reference.jetstream``: reference-model tokens compared with monolithic
  ``ReferenceModel.generate`` on the same prompt, and where the time to first token went;
- ``pipelining``: simulated chips with the link paced so the transfer takes about as long as the
  prefill; ``transfer_exposed_s`` = time to first token minus prefill minus the first decode step
  (target <= 0.25 x ``transfer_s``; without layer-wise overlap it would be ~1 x);
- ``prefix_reuse``: a second prompt sharing 80% of the first sends only the missing ``attn_kv``
  blocks plus the linear states (target ``bytes_second`` <= 0.3 x ``bytes_first``), same tokens;
- ``overhead_p50_ms``: job to first token minus the backend's own prefill, exposed transfer and
  first step, over sequential requests on simulated chips (target <= 5 ms).

Every figure is the median over ``--repeats`` requests with its range.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from libs.common import subjects
from libs.common.errors import UpstreamTimeout
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
    Transport,
    decode_stream_decoder,
    encode,
    instance_load_decoder,
    prefill_status_decoder,
)
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
                    raise UpstreamTimeout(f"{self.kind} {site}/{instance} silent after {timeout_s:.0f}s:\n{self.log_tail()}")
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
    final: DecodeFinished | ErrorReply | None = None
    status: PrefillFinished | ErrorReply | None = None
    first_token_s: float | None = None
    end_s: float = 0.0


class Caller:
    """A router stand-in at the decode site: sends both legs of each request and collects what comes back."""

    def __init__(self, nc: NatsClient, *, prefill_site: str = PREFILL_SITE, cluster: str = CLUSTER,
                 decode_site: str = DECODE_SITE, timeout_s: float = 5.0) -> None:
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
        await self.nc.flush()
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
                    await prefill_nc.publish(f"{self.prefix}.status.{probe}", encode(ErrorReply(code="probe", message="")))
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
            reservation = await self.decode.reserve(self.decode_site, decode_instance, DecodeJob(
                request_id=request_id, transfer_id=f"t{request_id}", model=model, prompt_tokens=prompt,
                max_tokens=max_tokens, reply_subject=f"{self.prefix}.reply.{request_id}", prefill_site=self.prefill_site,
                transport=transport, sampling=sampling, timeout_s=timeout_s, lease_s=lease_s))
            accepted = None
            if send_prefill:
                accepted = await self.prefill.submit(self.prefill_site, self.cluster, PrefillJob(
                    request_id=request_id, transfer_id=f"t{request_id}", model=model, prompt_tokens=prompt,
                    destination=reservation.destination, skip_blocks=reservation.held_blocks,
                    status_subject=f"{self.prefix}.status.{request_id}", codec=codec, timeout_s=timeout_s),
                    instance=prefill_instance)
            outcome = Outcome(request_id, reservation, accepted)
            async with asyncio.timeout(timeout_s + 10):
                while (wait_final and outcome.final is None) or (send_prefill and wait_status and outcome.status is None):
                    at, kind, msg = await queue.get()
                    if kind == "status":
                        outcome.status = msg
                    elif isinstance(msg, TokenChunk):
                        outcome.first_token_s = outcome.first_token_s or at - start
                        outcome.tokens += msg.token_ids
                        if first_token is not None:
                            first_token.set()
                    else:
                        outcome.final = msg
                        outcome.end_s = at - start
            return outcome
        finally:
            del self._streams[request_id]
