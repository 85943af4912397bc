"""The token chunks each request was sent, kept to send again when the router lost some on the way.

Core NATS drops what is published to a subject nobody listens to at that moment (the router's inbox
while its connection is coming back after a server restart), so the decode side keeps every chunk of
a running request and its last message, until ``keep_s`` after it ended; a request's chunks are
bounded by its ``max_tokens``. Used by one event loop: no locks.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from libs.common.errors import NotFound
from libs.common.messages import DecodeFinished, ErrorReply, ResentTokens, TokenChunk

MAX_RESENT_CHUNKS = 256  # per reply: far under NATS's 1 MiB payload even with top log probabilities


@dataclass
class _Sent:
    chunks: list[TokenChunk] = field(default_factory=list)
    final: DecodeFinished | ErrorReply | None = None


class TokenLog:
    """Each request's published chunks and final message, by request id, until ``keep_s`` after it ended."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self._sent: dict[str, _Sent] = {}
        self._ended: deque[tuple[float, str]] = deque()  # (forget at, request id), oldest first

    def __len__(self) -> int:
        return len(self._sent)

    def open(self, request_id: str) -> None:
        """Start keeping ``request_id``'s chunks."""
        self._forget_old(time.monotonic())
        self._sent[request_id] = _Sent()

    def add(self, chunk: TokenChunk) -> None:
        """Keep a chunk just published (its index is the count kept before it)."""
        sent = self._sent.get(chunk.request_id)
        if sent is not None:
            sent.chunks.append(chunk)

    def end(self, request_id: str, final: DecodeFinished | ErrorReply) -> None:
        """Keep the stream's last message; the request is forgotten ``keep_s`` from now."""
        sent = self._sent.get(request_id)
        if sent is None:
            return
        sent.final = final
        now = time.monotonic()
        self._forget_old(now)
        self._ended.append((now + self.keep_s, request_id))

    def since(self, request_id: str, from_index: int) -> ResentTokens:
        """The chunks from ``from_index`` (at most ``MAX_RESENT_CHUNKS``) and the final message after the last one;
        ``NotFound`` when the request is not kept here (never held, or ended over ``keep_s`` ago)."""
        self._forget_old(time.monotonic())
        sent = self._sent.get(request_id)
        if sent is None:
            raise NotFound(f"request {request_id}'s tokens are not kept here")
        chunks = tuple(sent.chunks[from_index : from_index + MAX_RESENT_CHUNKS])
        more = from_index + len(chunks) < len(sent.chunks)
        return ResentTokens(request_id=request_id, chunks=chunks, final=None if more else sent.final, more=more)

    def _forget_old(self, now: float) -> None:
        while self._ended and self._ended[0][0] <= now:
            _, request_id = self._ended.popleft()
            sent = self._sent.get(request_id)
            if sent is not None and sent.final is not None:
                del self._sent[request_id]
