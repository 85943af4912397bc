"""One long-lived inbox for every job's token stream and prefill status, demultiplexed by job id.

Subscribing once (``<inbox>.>``) instead of per request means the interest is known at every site
of the supercluster before the first request, so a status published at a remote site is never
dropped while a fresh subscription's interest is still propagating. What is published while the
router's connection is coming back (its server restarted) is lost all the same: the mailbox says
how often the connection came back and how long it has been up, so a stream asks for what it missed
and judges heartbeats only once they had time to arrive.
"""

from __future__ import annotations

import asyncio
import math
import time

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from prometheus_client import Counter

from libs.common.handling import own_bad_messages, refuse
from libs.common.messages import DecodeFinished, ErrorReply, PrefillFinished, TokenChunk

StreamItem = TokenChunk | DecodeFinished | PrefillFinished | ErrorReply
_decoder = msgspec.msgpack.Decoder(StreamItem)
TOKENS, STATUS = "tokens", "status"


class Mailbox:
    """Routes ``<prefix>.tokens.<job>`` and ``<prefix>.status.<job>`` messages to the job's queue."""

    def __init__(self, nc: NatsClient, bad_messages: Counter | None = None) -> None:
        self._nc = nc
        self._reconnects = nc.stats["reconnects"]
        self._up_since: float | None = -math.inf  # up since long enough: nothing was missed before the start
        self.prefix = nc.new_inbox()
        self.subject = f"{self.prefix}.>"  # what the router subscribes ``handle`` to
        self._queues: dict[str, asyncio.Queue[tuple[str, StreamItem]]] = {}
        # counted under {source="mailbox"}: the router's own counter once it passes it, else one of the mailbox's
        self.bad_messages = bad_messages or own_bad_messages("prfaas_router_bad_messages", "source")

    @property
    def connected(self) -> bool:
        """True while the router's connection is up."""
        return self._nc.is_connected

    def reconnects(self) -> int:
        """How many times the router's connection came back (after each, the inbox missed what was published
        meanwhile)."""
        return self._nc.stats["reconnects"]

    def up_for_s(self) -> float:
        """Seconds the connection has been up since it last came back (0 while it is down); seen by polling, so a
        short outage is seen at the next call."""
        now = time.monotonic()
        reconnects = self._nc.stats["reconnects"]
        if not self._nc.is_connected:
            self._up_since = None
            return 0.0
        if self._up_since is None or reconnects != self._reconnects:
            self._reconnects, self._up_since = reconnects, now
        return now - self._up_since

    def tokens_subject(self, job_id: str) -> str:
        """Where the decode side sends ``job_id``'s tokens."""
        return f"{self.prefix}.{TOKENS}.{job_id}"

    def status_subject(self, job_id: str) -> str:
        """Where the prefill side sends ``job_id``'s status."""
        return f"{self.prefix}.{STATUS}.{job_id}"

    def open(self, job_id: str) -> asyncio.Queue[tuple[str, StreamItem]]:
        """The queue of ``job_id``'s messages, as ``(TOKENS | STATUS, message)``."""
        queue = self._queues[job_id] = asyncio.Queue()
        return queue

    def close(self, job_id: str) -> None:
        """Stop collecting ``job_id``'s messages."""
        self._queues.pop(job_id, None)

    async def handle(self, msg: Msg) -> None:
        """Put a job's message on its queue (one for a job no longer collected is dropped, a malformed one counted)."""
        kind, _, job_id = msg.subject[len(self.prefix) + 1 :].partition(".")
        queue = self._queues.get(job_id)
        if queue is None:
            return
        try:
            item = _decoder.decode(msg.data)
        except msgspec.DecodeError as e:
            refuse(msg.subject, "mailbox", str(e), self.bad_messages)
            return
        if kind not in (TOKENS, STATUS):
            refuse(msg.subject, "mailbox", f"no stream {kind!r}", self.bad_messages)
            return
        queue.put_nowait((kind, item))
