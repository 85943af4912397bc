"""Server-Sent Events for streamed completions: one ``data:`` event per chunk, ``data: [DONE]`` last."""

from __future__ import annotations

from aiohttp import web

from libs.common.messages import json_encoder

_DONE = b"data: [DONE]\n\n"


class SseStream:
    """Writes JSON events on a prepared ``text/event-stream`` response."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request, headers: dict[str, str]) -> SseStream:
        """Send the status and headers of an event stream."""
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )
        await response.prepare(request)
        return cls(response)

    async def send(self, event: dict) -> None:
        """One ``data: <json>`` event (raises ConnectionResetError if the client is gone)."""
        await self.response.write(b"data: " + json_encoder.encode(event) + b"\n\n")

    async def done(self) -> None:
        """The terminating ``data: [DONE]`` event, then the end of the body."""
        await self.response.write(_DONE)
        await self.response.write_eof()
