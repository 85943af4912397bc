"""Keeps one attempt's token stream whole: duplicates dropped by index, what went missing asked for again.

Core NATS drops what is published to the router's inbox while its connection is coming back (a
server restart), so a stream cannot trust that every chunk arrives. A chunk past the next index (a
gap), a ``DecodeFinished`` counting more tokens than arrived, a reconnect of the router's connection,
or silence of ``quiet_s`` after the first token makes the stream ask the decode instance for its
chunks from the next index (``ResendTokens``); the reply's chunks and final message are replayed
before the inbox's. A decode instance that no longer keeps them (``not_found``), or a final message
that still counts more tokens after a resend, makes the gap unrepairable (``StreamGap``): never a
stream with tokens missing. A failed ask (nobody listening yet, no answer) is repeated every
``RETRY_S`` while the caller's liveness checks and deadlines decide.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque

from libs.common.errors import NotFound, PrfaasError
from libs.common.messages import DecodeFinished, TokenChunk
from services.decode_gateway.client import DecodeGatewayClient
from services.router.mailbox import TOKENS, Mailbox, StreamItem

log = logging.getLogger(__name__)
RETRY_S = 0.25  # between asks that failed


class StreamGap(PrfaasError):
    """Tokens of the stream were lost and the decode instance cannot send them again."""

    code = "stream_gap"


class StreamRepair:
    """One attempt's stream order: which chunk comes next, and the asks for what was lost."""

    def __init__(
        self, client: DecodeGatewayClient, mailbox: Mailbox, site: str, instance: str, job_id: str, quiet_s: float
    ) -> None:
        self.client, self.mailbox = client, mailbox
        self.site, self.instance, self.job_id = site, instance, job_id
        self.quiet_s = quiet_s
        self.next_index = 0
        self.tokens = 0  # tokens admitted
        self.replay: deque[tuple[str, StreamItem]] = deque()  # a resend's messages, taken before the inbox's
        self.wanted = False  # something is missing: ask
        self.heard_at = time.monotonic()
        self._asked_at = -math.inf
        self._short_finals = 0
        self._reconnects = mailbox.reconnects()

    def admit(self, chunk: TokenChunk) -> bool:
        """True for the next chunk in order (counted); a duplicate is dropped, a later one dropped and asked for."""
        if chunk.index != self.next_index:
            self.wanted = self.wanted or chunk.index > self.next_index
            return False
        self.next_index += 1
        self.tokens += len(chunk.token_ids)
        return True

    def complete(self, finished: DecodeFinished) -> bool:
        """True when every token ``finished`` counts arrived; else the rest is asked for (the final comes with it),
        and ``StreamGap`` when a resend already failed to bring them."""
        if self.tokens >= finished.completion_tokens:
            return True
        self._short_finals += 1
        if self._short_finals > 1:
            raise StreamGap(
                f"decode instance {self.instance} counted {finished.completion_tokens} tokens, {self.tokens} arrived"
            )
        self.wanted = True
        return False

    def due(self, started: bool) -> bool:
        """Whether to ask now: something is missing (a gap, a reconnect, silence after the first token) and the
        connection is up."""
        now = time.monotonic()
        reconnects = self.mailbox.reconnects()
        if reconnects != self._reconnects:  # what was published while the connection was down is lost
            self._reconnects, self.wanted = reconnects, True
        if started and now - max(self.heard_at, self._asked_at) >= self.quiet_s:
            self.wanted = True
        return self.wanted and self.mailbox.connected and now - self._asked_at >= RETRY_S

    async def ask(self) -> None:
        """Ask for the chunks from the next index and queue the reply for replay; ``StreamGap`` when the decode
        instance no longer keeps them (other failures are asked again later)."""
        self._asked_at = time.monotonic()
        try:
            reply = await self.client.resend(self.site, self.instance, self.job_id, self.next_index)
        except NotFound as e:
            raise StreamGap(f"tokens from chunk {self.next_index} were lost: {e.message}") from None
        except PrfaasError as e:
            log.info("resend not answered", extra={"request_id": self.job_id, "error": f"{e.code}: {e.message}"})
            return
        if reply.chunks or reply.final is not None:
            log.info(
                "tokens sent again",
                extra={"request_id": self.job_id, "from_index": self.next_index, "chunks": len(reply.chunks)},
            )
        self.wanted = reply.more
        self.replay.extend((TOKENS, chunk) for chunk in reply.chunks)
        if reply.final is not None:
            self.replay.append((TOKENS, reply.final))
