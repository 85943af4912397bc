"""Stopping owned tasks when a cancellation can be lost on the way (Python 3.11 ``wait_for`` races)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

RECANCEL_EVERY_S = 0.5


async def cancel_and_wait(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel the tasks and wait until all have ended, cancelling again any that swallowed it."""
    owned = list(tasks)
    pending = set(owned)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_EVERY_S)
    for task in owned:
        if not task.cancelled():
            task.exception()  # retrieved here: a failure that raced the stop is not worth a warning at exit
