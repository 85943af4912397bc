"""Ask an engine's replay socket (vLLM / SGLang ROUTER) for the batches it still buffers.

A DEALER sends ``[b"", start_seq (8-byte big-endian)]``; the engine answers one message per
buffered batch with ``seq >= start_seq``, oldest first, then one whose seq is -1. The engine sends
them in a tight loop and its ROUTER drops what exceeds its send queue (1,000 messages), so the
DEALER's receive queue is unbounded (the answers leave the engine as fast as the network carries
them) and answers lost anyway are asked for again, from the first one missing. A fresh socket per
request means a late answer to an abandoned request can never be taken for a new one.
"""

from __future__ import annotations

import asyncio
import time

import zmq
import zmq.asyncio

from libs.common.errors import BadRequest
from services.kv_index.engine_events import END_OF_REPLAY, split_replay_frames

MAX_REQUESTS = 5
IDLE_S = 0.5  # an engine sends its answers back to back: a longer pause means the rest were lost
YIELD_EVERY = 128


async def _request(
    context: zmq.asyncio.Context, url: str, start_seq: int, deadline: float
) -> tuple[dict[int, bytes], bool]:
    """One request: the answers received before ``deadline`` (monotonic s) or a pause of ``IDLE_S``
    between two of them, and whether the end marker came."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(url)
    got: dict[int, bytes] = {}
    try:
        await sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
        wait_s = deadline - time.monotonic()
        while wait_s > 0:
            async with asyncio.timeout(wait_s):  # not wait_for: on 3.11 it can swallow a cancellation
                frames = await sock.recv_multipart()
            seq, payload = split_replay_frames(frames)
            if seq == END_OF_REPLAY:
                return got, True
            got[seq] = payload
            if len(got) % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # answers already queued resolve at once: let lookups run meanwhile
            wait_s = min(IDLE_S, deadline - time.monotonic())
        return got, False
    except TimeoutError:
        return got, False
    except BadRequest as e:
        raise BadRequest(f"replay socket {url}: {e.message}") from None
    finally:
        sock.close(linger=0)


async def fetch_replay(
    context: zmq.asyncio.Context, url: str, start_seq: int, timeout_s: float
) -> tuple[dict[int, bytes], bool]:
    """``seq -> payload`` of the batches the engine buffers from ``start_seq`` on, within ``timeout_s``.

    The flag says whether the answers ran without a hole from the oldest received to the engine's
    end marker; ``BadRequest`` if an answer is malformed.
    """
    deadline = time.monotonic() + timeout_s
    got: dict[int, bytes] = {}
    ask = start_seq
    for _ in range(MAX_REQUESTS):
        answers, ended = await _request(context, url, ask, deadline)
        new = answers.keys() - got.keys()
        got.update(answers)
        if not got:
            return got, ended
        hole = next((s for s in range(min(got), max(got) + 1) if s not in got), None)
        if hole is None and ended:
            return got, True
        if not new or time.monotonic() >= deadline:
            break
        ask = max(got) + 1 if hole is None else hole
    return got, False
