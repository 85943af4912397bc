"""Ask an engine's replay socket (vLLM / SGLang ROUTER) for the batches it still buffers.

A DEALER sends ``[b"", start_seq (8-byte big-endian)]``; the engine answers one message per
buffered batch with ``seq >= start_seq``, oldest first, then one whose seq is -1. A fresh socket
per request means a late answer to an abandoned request can never be taken for a new one.
"""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio

from libs.common.errors import BadRequest, UpstreamTimeout
from services.kv_index.engine_events import END_OF_REPLAY, split_replay_frames


async def fetch_replay(context: zmq.asyncio.Context, url: str, start_seq: int, timeout_s: float) -> list[tuple[int, bytes]]:
    """``(seq, payload)`` of every batch the engine buffers from ``start_seq`` on, within ``timeout_s``."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    batches: list[tuple[int, bytes]] = []
    try:
        async with asyncio.timeout(timeout_s):
            await sock.send_multipart([b"", start_seq.to_bytes(8, "big")])
            while True:
                seq, payload = split_replay_frames(await sock.recv_multipart())
                if seq == END_OF_REPLAY:
                    return batches
                batches.append((seq, payload))
    except TimeoutError:
        raise UpstreamTimeout(f"replay socket {url} did not finish within {timeout_s}s ({len(batches)} batches received)") from None
    except BadRequest as e:
        raise BadRequest(f"replay socket {url}: {e.message}") from None
    finally:
        sock.close(linger=0)
