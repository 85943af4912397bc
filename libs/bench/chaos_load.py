"""The chaos run's traffic: long (remote) and short (local, a shared prefix) prompts at a fixed rate, streamed or not.

Each request is a ``/v1/completions`` body of token ids (``VOCAB``, as the case study sends them).
Long prompts are unique and above the default lab's threshold, so they are offloaded; short ones
start with one of a few shared prefixes, so prefix caches hit. Requests alternate between the
routers as a load balancer would; a connection refused before the request was sent goes to the
next router (as the OpenAI client retries a connection error), so a dead replica costs no request.
Each request ends ``ok`` (a 2xx answer, a stream ending with ``[DONE]`` and no error event), ``error``
(the client got a clear error: an HTTP error status, an SSE error event, a connection reset) or
``lost`` (nothing by the deadline). The router's outcome events say where it was prefilled and
how many tokens were cached.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import msgspec
import numpy as np
from nats.aio.client import Client as NatsClient

from libs.bench.case_study_load import VOCAB
from libs.common import subjects
from libs.common.messages import DecisionEvent, OutcomeEvent

LONG_TOKENS = 2_000  # above the default lab's 1,212-token threshold: offloaded to dc-a
SHORT_PREFIX_TOKENS, SHORT_TAIL_TOKENS = 256, 32  # four shared blocks: a cache hit at the prefill instance
PREFIXES = 3
OUTPUT_TOKENS = {"stream": 96, "whole": 16}  # a stream lasts ~0.5 s on the reference model: a fault finds some running
REQUEST_ID_HEADER = "x-prfaas-request-id"
CUT = "the stream ended without [DONE] or an error event"
_REFUSED_PAUSE_S = 0.25  # every router refused the connection: wait this long before the next round
_CONNECTION_RETRIES = 2  # a connection cut before the answer is sent again, as the OpenAI client does


@dataclass
class Call:
    """One request as the client saw it (times ``time.monotonic()``)."""

    index: int
    kind: str  # "long" or "short"
    stream: bool
    phase: str  # the fault whose window it was sent in
    sent_at: float
    router: str = ""  # the router that took it
    refused: int = 0  # connections refused before it was sent (tried on the next router)
    first_at: float | None = None  # first token (streams) or the whole answer
    done_at: float | None = None
    status: str = "pending"  # pending, ok, error, lost
    http_status: int = 0
    error: str = ""
    request_id: str = ""


class Outcomes:
    """The router site's outcome events by request id, and the instances each request's last decision chose."""

    def __init__(self, nc: NatsClient, site: str) -> None:
        self.nc, self.site = nc, site
        self.by_id: dict[str, OutcomeEvent] = {}
        self.decided: dict[str, tuple[str, str, float]] = {}  # request id -> the last decision's prefill, decode, when
        self.trail: dict[str, list[str]] = {}  # request id -> each decision's route, instances and why it fell back

    async def start(self) -> None:
        """Subscribe to the site's outcomes and decisions."""
        await self.nc.subscribe(subjects.outcomes(self.site), cb=self._take)
        await self.nc.subscribe(subjects.decisions(self.site), cb=self._decided)

    async def _take(self, msg) -> None:
        event = msgspec.json.decode(msg.data, type=OutcomeEvent)
        self.by_id[event.request_id] = event

    async def _decided(self, msg) -> None:
        event = msgspec.json.decode(msg.data, type=DecisionEvent)
        d = event.decision
        self.decided[event.request_id] = (d.prefill_instance, d.decode_instance, time.monotonic())
        step = f"{event.route} {d.prefill_instance}>{d.decode_instance}" + (
            f" ({d.fallback_of})" if d.fallback_of else ""
        )
        self.trail.setdefault(event.request_id, []).append(step)

    def decode_of(self, call: Call) -> str:
        """The decode instance ``call``'s last decision chose ("" if none is known)."""
        return self.decided.get(call.request_id, ("", "", 0.0))[1]

    def prefilling_on(self, instance: str, within_s: float = 0.1) -> bool:
        """A request was decided onto prefill ``instance`` in the last ``within_s`` and has not ended."""
        since = time.monotonic() - within_s
        return any(
            p == instance and at >= since and rid not in self.by_id
            for rid, (p, _, at) in list(self.decided.items())[-20:]
        )

    def of(self, call: Call) -> OutcomeEvent | None:
        """The outcome the router published for ``call`` (None if none arrived)."""
        return self.by_id.get(call.request_id)


@dataclass
class ChaosClient:
    """Sends requests to the routers open loop and keeps what each one did."""

    router_urls: list[str]
    model: str
    deadline_s: float
    seed: int = 0
    calls: list[Call] = field(default_factory=list)
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._prefixes = [self._rng.integers(0, VOCAB, SHORT_PREFIX_TOKENS) for _ in range(PREFIXES)]

    async def __aenter__(self) -> ChaosClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._session.close()

    def body(self, kind: str, stream: bool) -> bytes:
        """A request body: a unique long prompt, or a shared prefix and a unique tail."""
        if kind == "long":
            ids = self._rng.integers(0, VOCAB, LONG_TOKENS)
        else:
            prefix = self._prefixes[int(self._rng.integers(PREFIXES))]
            ids = np.concatenate([prefix, self._rng.integers(0, VOCAB, SHORT_TAIL_TOKENS)])
        return msgspec.json.encode(
            {
                "model": self.model,
                "prompt": ids.tolist(),
                "max_tokens": OUTPUT_TOKENS["stream" if stream else "whole"],
                "ignore_eos": True,
                "temperature": 0,
                "stream": stream,
            }
        )

    def send(self, kind: str, stream: bool, phase: str) -> Call:
        """Start one request now."""
        call = Call(len(self.calls), kind, stream, phase, time.monotonic())
        self.calls.append(call)
        task = asyncio.ensure_future(self._run(call, self.body(kind, stream)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return call

    def in_flight(self) -> int:
        """Requests sent and not ended."""
        return len(self._tasks)

    async def settle(self) -> None:
        """Wait until every request has ended (each is bounded by the deadline)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(self, call: Call, body: bytes) -> None:
        try:
            async with asyncio.timeout(self.deadline_s):
                await self._post(call, body)
        except TimeoutError:
            call.status, call.error = "lost", f"no answer and no error within {self.deadline_s:g} s"
        finally:
            call.done_at = time.monotonic()

    async def _post(self, call: Call, body: bytes) -> None:
        n = len(self.router_urls)
        attempt = broken = 0
        while True:
            url = self.router_urls[(call.index + attempt) % n]
            answered = False
            try:
                async with self._session.post(
                    url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    call.router, answered = url, True
                    await self._answer(call, resp)
                    return
            except aiohttp.ClientConnectorError as e:  # refused before anything was sent: the next router
                call.refused += 1
                attempt += 1
                if attempt % n == 0:
                    await asyncio.sleep(_REFUSED_PAUSE_S)
                call.error = repr(e)
            except (aiohttp.ClientError, OSError) as e:
                if not answered and broken < _CONNECTION_RETRIES:  # cut before the answer's head: the OpenAI
                    broken += 1  # client sends it again (max_retries), here to the other router
                    attempt += 1
                    call.error = repr(e)
                    continue
                call.router = url
                call.status, call.error = "error", repr(e)
                return

    async def _answer(self, call: Call, resp: aiohttp.ClientResponse) -> None:
        call.request_id = resp.headers.get(REQUEST_ID_HEADER, "")
        call.http_status = resp.status
        if resp.status != 200:
            call.status, call.error = "error", f"HTTP {resp.status}: {(await resp.text())[:200]}"
            return
        if not call.stream:
            await resp.read()
            call.first_at = time.monotonic()
            call.status = "ok"
            return
        events = _Events()
        async for data in resp.content.iter_any():
            if call.first_at is None:
                call.first_at = time.monotonic()
            events.feed(data)
        if events.error:
            call.status, call.error = "error", f"error event: {events.error[:200]}"
        elif events.done:
            call.status = "ok"
        else:
            call.status, call.error = "error", CUT


class _Events:
    """An SSE body read as it arrives: whether it ended with ``[DONE]`` and the first error event."""

    def __init__(self) -> None:
        self.done = False
        self.error = ""
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the body."""
        *events, self._buffer = (self._buffer + data).split(b"\n\n")
        for event in events:
            if event == b"data: [DONE]":
                self.done = True
            elif event.startswith(b"data: ") and b'"error"' in event and not self.error:
                self.error = event[6:].decode(errors="replace")
