"""Server-Sent Events for streamed completions: one ``data:`` event per chunk, ``data: [DONE]`` last.

Each event is one write: the status line and headers leave with the first event, and the last events
leave with ``[DONE]`` and the end of the body, so a short answer costs the router three socket writes.
"""

from __future__ import annotations

from aiohttp import web

_DONE = b"data: [DONE]\n\n"


class _EventStreamResponse(web.StreamResponse):
    """A streamed response whose headers are sent with its first body write (one packet, not two)."""

    _send_headers_immediately = False


def event(body: bytes) -> bytes:
    """One SSE event carrying an encoded JSON body."""
    return b"data: " + body + b"\n\n"


class SseStream:
    """Writes events on a ``text/event-stream`` response."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request, headers: dict[str, str], first: bytes) -> SseStream:
        """Send the status, the headers and the first event (raises ConnectionResetError if the client is gone)."""
        response = _EventStreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
        await response.prepare(request)
        await response.write(first)
        return cls(response)

    async def send(self, data: bytes) -> None:
        """One or more encoded events (raises ConnectionResetError if the client is gone)."""
        await self.response.write(data)

    async def close(self, last: bytes = b"") -> None:
        """The last events, the terminating ``data: [DONE]`` and the end of the body, in one write."""
        await self.response.write_eof(last + _DONE)
