"""A token stream reaches the client whole or ends with an error: a lost chunk is asked for again, never skipped.

The gateways here are stand-ins publishing by hand on a real nats-server, so a test decides exactly
which chunk is lost on the way; the decode stand-in answers resends from the gateway's own ``TokenLog``.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from libs.common import subjects
from libs.common.bus import settle
from libs.common.handling import answer, decoded
from libs.common.messages import (
    DecodeFinished,
    DecodeReservation,
    DecodeTimings,
    KvDestination,
    PrefillAccepted,
    TokenChunk,
    decode_job_decoder,
    encode,
    resend_tokens_decoder,
)
from services.decode_gateway.token_log import TokenLog
from tests.router.conftest import HTTP_TIMEOUT, heartbeat, load, sse_events
from tests.router.deployment import PD

DECODE, PREFILL = "sr-d0", "sr-l0"
STEPS = [[72], [101], [108, 108], [111], [33]]  # "Hello!" in the reference model's byte tokens
WHOLE = "Hello!"
QUIET_S = 0.5  # the router's resend_after_s here: a stream this silent asks for what it lost


class StandIns:
    """A decode and a prefill gateway by hand: reserve, accept, then publish the steps' chunks but ``lost`` ones."""

    def __init__(self, nc, lost: set[int], keep: bool) -> None:
        self.nc = nc
        self.lost = lost
        self.log = TokenLog(keep_s=30.0 if keep else 0.0)  # keep_s 0: forgotten as soon as the stream ended
        self.resends: list[int] = []
        self._reply = ""
        self._job_id = ""

    async def start(self) -> None:
        """Subscribe as both gateways, and heartbeat as them."""
        await self.nc.subscribe(subjects.decode_jobs(PD, DECODE), cb=self._reserve)
        await self.nc.subscribe(subjects.decode_resend(PD, DECODE), cb=self._resend)
        await self.nc.subscribe(subjects.prefill_instance_jobs(PD, "pd", PREFILL), cb=self._accept)
        await heartbeat(self.nc, load(DECODE), load(PREFILL, role="prefill"))

    async def _reserve(self, msg) -> None:
        job = decode_job_decoder.decode(msg.data)
        self._reply, self._job_id = job.reply_subject, job.request_id
        self.log.open(job.request_id)
        reservation = DecodeReservation(
            request_id=job.request_id,
            transfer_id=job.transfer_id,
            destination=KvDestination(site=PD, instance=DECODE),
            held_blocks=0,
            reserved_bytes=0,
            lease_s=10.0,
        )
        await msg.respond(encode(reservation))

    async def _accept(self, msg) -> None:
        accepted = PrefillAccepted(
            request_id=self._job_id, site=PD, instance=PREFILL, queue_position=0, expected_wait_s=0.0, cached_blocks=0
        )
        await msg.respond(encode(accepted))
        for index, ids in enumerate(STEPS):
            chunk = TokenChunk(request_id=self._job_id, index=index, token_ids=ids)
            self.log.add(chunk)
            if index not in self.lost:
                await self.nc.publish(self._reply, encode(chunk))
        final = DecodeFinished(
            request_id=self._job_id,
            site=PD,
            instance=DECODE,
            finish_reason="stop",
            prompt_tokens=16,
            completion_tokens=sum(map(len, STEPS)),
            held_tokens=0,
            received_bytes=0,
            timings=DecodeTimings(kv_wait_s=0.0, transfer_s=0.0, queue_s=0.0, first_token_s=0.0, total_s=0.0),
        )
        self.log.end(self._job_id, final)
        if len(STEPS) not in self.lost:  # the index past the last chunk stands for the final message
            await self.nc.publish(self._reply, encode(final))

    async def _resend(self, msg) -> None:
        async def resent():
            ask = decoded(resend_tokens_decoder, msg, "resend", _NO_COUNT)
            self.resends.append(ask.from_index)
            return self.log.since(ask.request_id, ask.from_index)

        await answer(msg, resent)


class _NoCount:
    """A counter stand-in for ``decoded`` (the test counts nothing)."""

    def labels(self, *_):
        return self

    def inc(self) -> None:
        pass


_NO_COUNT = _NoCount()


async def _stream(svc) -> tuple[str, list[dict]]:
    """The streamed completion's text and its errors (events in the stream, or the body of an error status)."""
    body = {"model": "reference", "prompt": [7] * 16, "max_tokens": 8, "stream": True}
    text, errors = "", []
    async with aiohttp.ClientSession(timeout=HTTP_TIMEOUT) as http:
        async with http.post(svc.url + "/v1/completions", json=body) as resp:
            if resp.status != 200:  # failed before the stream's first write
                return text, [(await resp.json())["error"]]
            async for event in sse_events(resp):
                if "error" in event:
                    errors.append(event["error"])
                else:
                    text += event["choices"][0]["text"] or ""
    return text, errors


@contextlib.asynccontextmanager
async def _serving(start_router, nc, lost: set[int], keep: bool = True):
    stand_ins = StandIns(nc, lost, keep)
    await stand_ins.start()
    svc = await start_router(resend_after_s=QUIET_S, token_timeout_s=10.0, first_token_timeout_s=10.0)
    await heartbeat(nc, load(DECODE), load(PREFILL, role="prefill"))
    await settle(nc)
    yield svc, stand_ins


async def test_a_lost_middle_chunk_is_asked_for_again(nats_url, nc, start_router):
    """Chunk 2 of 5 lost on the way: the router asks from index 2 and the client gets every token, in order."""
    async with _serving(start_router, nc, lost={2}) as (svc, stand_ins):
        text, errors = await _stream(svc)
    assert (text, errors) == (WHOLE, [])
    assert stand_ins.resends[:1] == [2]


async def test_a_lost_last_chunk_is_asked_for_before_the_stream_ends(nats_url, nc, start_router):
    """The last chunk lost and the final message arrived: the final's token count makes the router ask first."""
    async with _serving(start_router, nc, lost={len(STEPS) - 1}) as (svc, stand_ins):
        text, errors = await _stream(svc)
    assert (text, errors) == (WHOLE, [])
    assert stand_ins.resends[:1] == [len(STEPS) - 1]


async def test_lost_chunks_and_final_after_silence_are_asked_for(nats_url, nc, start_router):
    """The stream's tail and its final message lost: silence past resend_after_s asks, and the stream completes."""
    async with _serving(start_router, nc, lost={3, 4, len(STEPS)}) as (svc, stand_ins):
        async with asyncio.timeout(10 * QUIET_S):  # one silence and one ask; 10x for a loaded 2-core machine
            text, errors = await _stream(svc)
    assert (text, errors) == (WHOLE, [])
    assert stand_ins.resends[:1] == [3]


async def test_a_gap_the_decode_side_forgot_ends_the_stream_with_an_error(nats_url, nc, start_router):
    """Chunk 2 lost and no longer kept by the decode side: the stream ends with an error event, not wrong text."""
    async with _serving(start_router, nc, lost={2}, keep=False) as (svc, stand_ins):
        async with asyncio.timeout(10 * QUIET_S):  # at once, not after token_timeout_s (10 s); 10x for a loaded machine
            text, errors = await _stream(svc)
    assert [e["code"] for e in errors] == ["decode_failed"]
    assert WHOLE.startswith(text) and text != WHOLE  # what arrived before the gap, nothing past it
    assert stand_ins.resends == [2]
