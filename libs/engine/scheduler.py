"""Continuous batching for async backends: one owned task steps every active request together."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from libs.common.errors import NoCapacity
from libs.engine.sampling import DecodeOutput

StepFn = Callable[[list[Any]], Awaitable[list[DecodeOutput]]]
T = TypeVar("T")
_END = object()


@dataclass
class _Slot:
    sequence: Any
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    gone: bool = False  # the consumer stopped listening


class DecodeLoop:
    """Requests join between steps while fewer than ``max_batch`` are active, and leave when finished.

    ``step(sequences)`` advances every sequence by one token and returns one output per sequence.
    The loop task starts with the first request, ends when none is left, and ``close()`` cancels it.
    """

    def __init__(self, step: StepFn, max_batch: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._step = step
        self.max_batch = max_batch
        self._active: list[_Slot] = []
        self._waiting: deque[_Slot] = deque()
        self._task: asyncio.Task | None = None
        self.steps = 0  # batched steps taken so far
        self.arrived = asyncio.Event()  # set when a request starts waiting; a step that runs long may end early

    @property
    def active(self) -> int:
        """Requests in the running batch."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests waiting for a free slot."""
        return len(self._waiting)

    async def run(self, sequence: Any) -> AsyncIterator[DecodeOutput]:
        """Decode one sequence in the shared batch, yielding its outputs until it finishes."""
        slot = _Slot(sequence)
        self._waiting.append(slot)
        self.arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="decode-loop")
        try:
            while True:
                item = await slot.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            slot.gone = True
            with contextlib.suppress(ValueError):
                self._waiting.remove(slot)

    async def _loop(self) -> None:
        while True:
            self._active = [s for s in self._active if not s.gone]
            while self._waiting and len(self._active) < self.max_batch:
                self._active.append(self._waiting.popleft())
            if not self._active:
                return
            if not self._waiting or len(self._active) >= self.max_batch:
                self.arrived.clear()  # nothing can join before this step ends unless a new request arrives
            batch = list(self._active)
            try:
                outputs = await self._step([s.sequence for s in batch])
            except Exception as e:  # every request of the failed step ends with the error
                for slot in batch:
                    slot.queue.put_nowait(e)
                self._active = []
                continue
            self.steps += 1
            for slot, out in zip(batch, outputs, strict=True):
                slot.queue.put_nowait(out)
                if out.finish_reason is not None:
                    slot.gone = True

    async def close(self) -> None:
        """Cancel the loop task and wait for it; requests still running or waiting end with ``NoCapacity``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for slot in [*self._active, *self._waiting]:
            slot.queue.put_nowait(NoCapacity("the decode loop was closed"))
        self._active, self._waiting = [], deque()


async def run_ahead(producer: AsyncIterator[T]) -> AsyncIterator[T]:
    """Drive ``producer`` in an owned task that never waits for the consumer, buffering its items.

    Prefill uses it so compute (and the prefill slot) is not held up by a slow transfer. Leaving
    the iteration early cancels the producer; its exceptions reach the consumer.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in producer:
                queue.put_nowait(item)
            queue.put_nowait(_END)
        except Exception as e:
            queue.put_nowait(e)

    task = asyncio.create_task(pump(), name="prefill-producer")
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
