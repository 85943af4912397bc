"""Server-Sent Events for streamed completions: one ``data:`` event per chunk, ``data: [DONE]`` last.

Each event is one write: the status line and headers leave with the first event, and the last events
leave with ``[DONE]`` and the end of the body, so a short answer costs the router three socket writes.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

_DONE = b"data: [DONE]\n\n"


class _EventStreamResponse(web.StreamResponse):
    """A streamed response whose headers are sent with its first body write (one packet, not two)."""

    _send_headers_immediately = False


def event(body: bytes) -> bytes:
    """One SSE event carrying an encoded JSON body."""
    return b"data: " + body + b"\n\n"


class SseStream:
    """Writes events on a ``text/event-stream`` response; a client that takes none for ``write_timeout_s`` is gone."""

    def __init__(self, response: web.StreamResponse, write_timeout_s: float) -> None:
        self.response = response
        self.write_timeout_s = write_timeout_s

    @classmethod
    async def open(
        cls, request: web.Request, headers: dict[str, str], first: bytes, write_timeout_s: float
    ) -> SseStream:
        """Send the status, the headers and the first event (raises ConnectionResetError if the client is gone)."""
        response = _EventStreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                **headers,
            },
        )
        stream = cls(response, write_timeout_s)
        await response.prepare(request)
        await stream.send(first)
        return stream

    async def send(self, data: bytes) -> None:
        """One or more encoded events (raises ConnectionResetError if the client is gone or stopped reading)."""
        await self._within_deadline(self.response.write(data))

    async def close(self, last: bytes = b"") -> None:
        """The last events, the terminating ``data: [DONE]`` and the end of the body, in one write."""
        await self._within_deadline(self.response.write_eof(last + _DONE))

    async def _within_deadline(self, write) -> None:
        try:
            async with asyncio.timeout(self.write_timeout_s):
                await write
        except TimeoutError:
            raise ConnectionResetError(f"the client took no data for {self.write_timeout_s}s") from None
