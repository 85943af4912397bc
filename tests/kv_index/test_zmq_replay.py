"""The replay client against a publisher process: whole answers even when the engine's ROUTER drops some."""

from __future__ import annotations

import asyncio
import time

import zmq.asyncio

from libs.lab.servers import free_port
from libs.lab.vllm_publisher import store
from services.kv_index.zmq_replay import fetch_replay

BUFFERED = 5_000  # 64 KB-ish TCP buffers and the engine's 1,000-message send queue hold far fewer


async def test_replay_arrives_whole_while_the_reader_is_busy(engines):
    """The index busy for a second while an engine streams 5,000 buffered batches: every one still arrives, in order."""
    engine = await engines("vllm-seven-fields")
    await engine.send_many([[store(list(range(i * 512, (i + 1) * 512)))] for i in range(BUFFERED)])
    context = zmq.asyncio.Context()

    async def busy() -> None:
        await asyncio.sleep(0.02)  # the request is out; now the loop is stuck (e.g. in a long computation)
        time.sleep(1.0)  # noqa: ASYNC251 - blocking the loop is the point

    hog = asyncio.create_task(busy())
    try:
        got, whole = await fetch_replay(context, f"tcp://127.0.0.1:{engine.replay_port}", 0, timeout_s=20)
        assert whole and sorted(got) == list(range(BUFFERED))
        tail, whole = await fetch_replay(context, f"tcp://127.0.0.1:{engine.replay_port}", BUFFERED - 3, timeout_s=5)
        assert whole and sorted(tail) == [BUFFERED - 3, BUFFERED - 2, BUFFERED - 1]
    finally:
        await hog
        context.term()


async def test_a_silent_replay_socket_answers_nothing_within_the_deadline():
    """Nobody behind the replay address: empty and not whole, after the deadline and not much later."""
    context = zmq.asyncio.Context()
    try:
        start = time.monotonic()
        got, whole = await fetch_replay(context, f"tcp://127.0.0.1:{free_port()}", 0, timeout_s=0.3)
        # Lower bound: the deadline itself; upper: 2 s leaves room for a loaded 2-core box.
        assert 0.3 <= time.monotonic() - start < 2.0
        assert (got, whole) == ({}, False)
    finally:
        context.term()
