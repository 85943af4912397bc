"""A cap on the router's open HTTP connections: past it a new connection is closed at once, and counted."""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import Counter


class _Closed(asyncio.Protocol):
    """A connection past the cap: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class CappedSite(web.TCPSite):
    """``web.TCPSite`` that accepts at most ``max_connections`` open connections; the open ones keep working."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, max_connections: int, refused: Counter) -> None:
        super().__init__(runner, host, port)
        self.max_connections = max_connections
        self.refused = refused

    def _protocol(self) -> asyncio.Protocol:
        server = self._runner.server
        if len(server.connections) >= self.max_connections:
            self.refused.labels("too_many_connections").inc()
            return _Closed()
        return server()

    async def start(self) -> None:
        """Register the site and listen, each connection through the cap (what ``TCPSite.start`` does otherwise)."""
        self._runner._reg_site(self)
        self._server = await asyncio.get_running_loop().create_server(self._protocol, self._host, self._port)
        self._bound_port = self._server.sockets[0].getsockname()[1]
