"""A process that was suspended (stopped, frozen) keeps no work nobody waits for.

While the process did not run, its heartbeats stopped: past their TTL every router gave up on the
jobs it held here, fell back and sent cancels, which are lost if the server dropped the connection
meanwhile. When the event loop finds that it did not run for ``suspended_s`` or more, every job
it holds then (each was received before the loop stopped) ends at once (``cancelled``): its queue
place, compute and transfer. Jobs read afterwards from what the socket buffered are not judged
here: their cancels come with them, or their transfers are refused (the reservation is gone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from libs.common.jobs import JobTable
from services.prefill_gateway.job import PrefillRun

log = logging.getLogger(__name__)


async def watch_suspensions(every_s: float, limit_s: float, suspended: Callable[[float], None]) -> None:
    """Call ``suspended(lasted_s)`` each time the loop did not run for ``limit_s`` or more (ticks every ``every_s``)."""
    last = time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        now = time.monotonic()
        if now - last >= limit_s:
            suspended(now - last)
        last = now


def end_held_jobs(runs: JobTable[PrefillRun], lasted_s: float) -> None:
    """End every job held after a suspension of ``lasted_s``: their callers have given up on them."""
    held = list(runs)
    log.warning("process was suspended", extra={"suspended_s": round(lasted_s, 3), "jobs_ended": len(held)})
    for run in held:
        runs.cancel(run.job.request_id, f"the prefill gateway was suspended for {lasted_s:.1f}s: its caller fell back")
