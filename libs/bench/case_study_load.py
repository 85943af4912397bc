"""The case study's traffic: Poisson arrivals of case-study prompt lengths, sent as token ids, streamed from the router.

Prompts are token-id lists (the router does not tokenize): a first block of ids unique to the
request, then a slice of one random sequence, so no two prompts share a block (the planner assumes
no prefix hits). Lengths follow the case-study workload; ``stratified_lengths`` draws one length from
each of n equal-probability strata of it, in random order: the same distribution with far less
sampling noise in a few hundred requests. Each request asks for ``output_tokens`` with ``ignore_eos``
and streams; its time to first token is the time to the response's headers, which the router sends
with the first token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import msgspec
import numpy as np

from libs.planner.workloads import CASE_STUDY_WORKLOAD, Workload

VOCAB = 256  # token ids in [0, 256): inside the byte tokenizer's vocabulary (the lab routers' default)
_QUANTILE_SAMPLES = 200_000  # draws the strata's quantiles are read from


def stratified_lengths(n: int, rng: np.random.Generator, workload: Workload = CASE_STUDY_WORKLOAD) -> np.ndarray:
    """``n`` lengths, one from each of ``n`` equal-probability strata of ``workload``, shuffled (int64)."""
    pool = np.sort(workload.sample(rng, _QUANTILE_SAMPLES))
    u = (np.arange(n) + rng.uniform(size=n)) / n
    lengths = pool[np.minimum((u * len(pool)).astype(np.int64), len(pool) - 1)]
    return rng.permutation(lengths)


def poisson_times(rate_rps: float, spans_s: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Poisson arrivals of ``rate_rps`` over consecutive spans, each holding its expected count (round(rate x span)).

    Given its count, a Poisson process's arrivals are independent and uniform over the span, so the
    gaps stay random while each window offers exactly its rate: an unconditioned window of ~200
    arrivals offers its rate +-7% (one sigma), more than the search's 10% tolerance can resolve.
    """
    out, start = [], 0.0
    for span in spans_s:
        out.append(start + np.sort(rng.uniform(0.0, span, round(rate_rps * span))))
        start += span
    return np.concatenate(out) if out else np.zeros(0)


class PromptBank:
    """Request bodies for ``/v1/completions``: prompts of given lengths sharing no block, built without re-encoding."""

    def __init__(self, model: str, max_prompt_tokens: int, output_tokens: int, block_size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.block_size = block_size
        self._rng = rng
        ids = rng.integers(0, VOCAB, max_prompt_tokens)
        texts = [str(int(i)).encode() for i in ids]
        self._tail = b",".join(texts)
        self._ends = np.cumsum([len(t) + 1 for t in texts]) - 1  # byte offset just past id i
        head = msgspec.json.encode({"model": model, "max_tokens": output_tokens, "ignore_eos": True, "stream": True})
        self._head = head[:-1] + b',"stream_options":{"include_usage":true},"temperature":0,"prompt":['

    def body(self, length: int) -> bytes:
        """A body whose prompt has ``length`` ids, its first block drawn afresh (no other prompt shares a block)."""
        first = self._rng.integers(0, VOCAB, min(length, self.block_size))
        rest = length - len(first)
        parts = [self._head, b",".join(str(int(i)).encode() for i in first)]
        if rest:
            parts += [b",", self._tail[: self._ends[rest - 1]]]
        return b"".join(parts) + b"]}"


@dataclass
class Sent:
    """One request as the client saw it; times are ``time.monotonic()``."""

    index: int
    prompt_tokens: int
    sent_at: float
    first_at: float | None = None
    done_at: float | None = None
    status: str = "pending"  # pending, ok, error, cancelled
    request_id: str = ""
    completion_tokens: int = 0  # tokens streamed
    usage_tokens: int = 0  # what the response's usage said
    error: str = ""
    answered: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # first token, or the end

    @property
    def ttft_s(self) -> float | None:
        """Send to first token (None without one)."""
        return None if self.first_at is None else self.first_at - self.sent_at


@dataclass
class Driver:
    """Sends requests to a router open loop and keeps what each one did."""

    router_url: str
    bank: PromptBank
    sent: list[Sent] = field(default_factory=list)
    _tasks: set[asyncio.Task] = field(default_factory=set)
    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Driver:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cancel_all()
        await self._session.close()

    async def offer(self, lengths: np.ndarray, times: np.ndarray, start_at: float) -> list[Sent]:
        """Send request i at ``start_at + times[i]`` with a prompt of ``lengths[i]`` ids; return once all are sent."""
        batch = []
        for length, at in zip(lengths, times, strict=True):
            delay = start_at + float(at) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            batch.append(self.send(int(length)))
        return batch

    async def router_metric(self, histogram: str) -> tuple[float, int]:
        """A histogram's sum and count from the router's ``/metrics`` ((0, 0) if absent)."""
        async with self._session.get(self.router_url + "/metrics") as resp:
            text = await resp.text()
        values = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in (f"{histogram}_sum", f"{histogram}_count"):
                values[name] = float(value)
        return values.get(f"{histogram}_sum", 0.0), int(values.get(f"{histogram}_count", 0))

    def send(self, length: int) -> Sent:
        """Start one request now."""
        record = Sent(len(self.sent), length, time.monotonic())
        self.sent.append(record)
        task = asyncio.ensure_future(self._run(record, self.bank.body(length)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return record

    def in_flight(self) -> int:
        """Requests sent and not ended."""
        return len(self._tasks)

    async def cancel_all(self) -> None:
        """Close every request still in flight (the router cancels its jobs)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def first_tokens(self, records: list[Sent], deadline_s: float) -> None:
        """Wait until every record has its first token or has ended, at most ``deadline_s``."""
        waits = [asyncio.ensure_future(r.answered.wait()) for r in records if not r.answered.is_set()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=deadline_s)
            for task in pending:
                task.cancel()

    async def _run(self, record: Sent, body: bytes) -> None:
        try:
            async with self._session.post(
                self.router_url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                record.request_id = resp.headers.get("x-prfaas-request-id", "")
                if resp.status != 200:
                    record.status, record.error = "error", f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return
                record.first_at = time.monotonic()
                record.answered.set()
                stream = _Stream()
                async for data in resp.content.iter_any():
                    stream.feed(data)
                record.completion_tokens, record.usage_tokens = stream.tokens, stream.usage_tokens
                record.status = "ok" if stream.done else "error"
        except asyncio.CancelledError:
            record.status = "cancelled"
            raise
        except (aiohttp.ClientError, OSError) as e:
            record.status, record.error = "error", repr(e)
        finally:
            record.done_at = time.monotonic()
            record.answered.set()


class _Choice(msgspec.Struct):
    text: str = ""


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


class _Stream:
    """An SSE completion stream read as it arrives: tokens streamed (one character each), usage, the end."""

    def __init__(self) -> None:
        self.tokens = 0  # characters of text: the simulated decode's tokens are ASCII bytes (the byte tokenizer)
        self.usage_tokens = 0
        self.done = False
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the body."""
        *events, self._buffer = (self._buffer + data).split(b"\n\n")
        for event in events:
            if event == b"data: [DONE]":
                self.done = True
            elif event.startswith(b"data: "):
                chunk = _chunk_decoder.decode(event[6:])
                self.tokens += sum(len(c.text) for c in chunk.choices)
                if chunk.usage is not None:
                    self.usage_tokens = chunk.usage.completion_tokens
