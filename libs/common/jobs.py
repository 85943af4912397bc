"""The requests a gateway holds, by request id: each runs as an owned task; a ``JobCancel`` or a stop ends it.

Both gateways keep one ``JobTable`` of their records (a decode reservation, a prefill run); the
record learns why it was cancelled (``cancel_reason``), so its task can answer accordingly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator
from typing import Generic, Protocol, TypeVar

from nats.aio.msg import Msg
from prometheus_client import Counter

from libs.common.handling import decoded_or_none
from libs.common.messages import job_cancel_decoder

log = logging.getLogger(__name__)

SHUTDOWN = "the gateway is shutting down"  # the cancel reason of jobs still held when a drain times out


class Cancellable(Protocol):
    """A held request's record: it carries the reason it was cancelled for ("" while it runs)."""

    cancel_reason: str


R = TypeVar("R", bound=Cancellable)


class JobTable(Generic[R]):
    """Held requests by request id, each with the task that runs it until it ends."""

    def __init__(self) -> None:
        self._records: dict[str, R] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[R]:
        return iter(list(self._records.values()))

    def get(self, request_id: str) -> R | None:
        """The record of a held request, or None."""
        return self._records.get(request_id)

    def start(self, request_id: str, record: R, run: Awaitable[None]) -> None:
        """Hold ``record`` and run its request as an owned task; it leaves the table when the task ends."""
        self._records[request_id] = record
        task = self._tasks[request_id] = asyncio.ensure_future(run)
        task.add_done_callback(lambda _: self._forget(request_id, task))

    def cancel(self, request_id: str, reason: str) -> bool:
        """Stop a held request, telling its record why; False if it is not held here."""
        record, task = self._records.get(request_id), self._tasks.get(request_id)
        if record is None or task is None:
            return False
        record.cancel_reason = record.cancel_reason or reason or "cancelled"
        task.cancel()
        return True

    async def drain(self, timeout_s: float) -> None:
        """Let held requests finish within ``timeout_s``, then cancel the rest (``SHUTDOWN``) and wait for them."""
        if self._tasks:
            log.info("draining", extra={"requests": len(self._tasks), "timeout_s": timeout_s})
            await asyncio.wait(list(self._tasks.values()), timeout=timeout_s)
        for request_id in list(self._records):
            self.cancel(request_id, SHUTDOWN)
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def handle_cancel(self, msg: Msg, bad_messages: Counter) -> None:
        """A ``JobCancel`` (sent to every gateway): stop the request if it is held here."""
        cancel = decoded_or_none(job_cancel_decoder, msg, "cancel", bad_messages)
        if cancel is not None and self.cancel(cancel.request_id, cancel.reason):
            log.info("request cancelled", extra={"request_id": cancel.request_id, "reason": cancel.reason})

    def _forget(self, request_id: str, task: asyncio.Task) -> None:
        if self._tasks.get(request_id) is task:
            del self._tasks[request_id], self._records[request_id]
