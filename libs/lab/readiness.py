"""Readiness probes of lab processes (async, each attempt under a short deadline)."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import aiohttp
import nats.errors
from nats.aio.client import Client as NatsClient

from libs.common.bus import connect
from libs.common.messages import KvLookupRequest, encode
from libs.lab.plan import Ready

_ATTEMPT_S = 1.0


class Probes:
    """Probes sharing one HTTP session and one NATS connection per URL; ``close()`` when done."""

    def __init__(self) -> None:
        self._http: aiohttp.ClientSession | None = None
        self._nats: dict[str, NatsClient] = {}

    async def close(self) -> None:
        """Close the session and the NATS connections."""
        if self._http is not None:
            await self._http.close()
        for nc in self._nats.values():
            with contextlib.suppress(Exception):
                await nc.close()

    async def ready(self, ready: Ready) -> None:
        """Return once ``ready`` holds (the caller bounds the wait); each attempt has its own deadline."""
        probe = {
            "nats": self._nats_server,
            "redis": self._redis,
            "http": self._http_ok,
            "reply": self._reply,
            "heartbeats": self._heartbeats,
        }[ready.kind]
        while True:
            try:
                async with asyncio.timeout(_ATTEMPT_S * 5):
                    if await probe(ready):
                        return
            except (OSError, TimeoutError, aiohttp.ClientError, nats.errors.Error, ValueError):
                pass
            await asyncio.sleep(0.05)

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_ATTEMPT_S))
        return self._http

    async def _get_json(self, url: str) -> tuple[int, dict]:
        async with (await self._session()).get(url) as resp:
            return resp.status, await resp.json(content_type=None)

    async def _nats_server(self, ready: Ready) -> bool:
        status, health = await self._get_json(ready.url + "/healthz")
        if status != 200 or health.get("status") != "ok":
            return False
        if not ready.names:
            return True
        _, gw = await self._get_json(ready.url + "/gatewayz")
        outbound, inbound = gw.get("outbound_gateways") or {}, gw.get("inbound_gateways") or {}
        return all(name in outbound and name in inbound for name in ready.names)

    async def _redis(self, ready: Ready) -> bool:
        host, port = ready.url.removeprefix("redis://").split("/")[0].rsplit(":", 1)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), _ATTEMPT_S)
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return (await asyncio.wait_for(reader.readline(), _ATTEMPT_S)).startswith(b"+PONG")
        finally:
            writer.close()

    async def _http_ok(self, ready: Ready) -> bool:
        async with (await self._session()).get(ready.url) as resp:
            return resp.status == 200

    async def _client(self, url: str) -> NatsClient:
        if url not in self._nats:
            self._nats[url] = await connect(url, name="prfaas-lab-probe", connect_timeout_s=_ATTEMPT_S)
        return self._nats[url]

    async def _reply(self, ready: Ready) -> bool:
        nc = await self._client(ready.url)
        await nc.request(ready.names[0], encode(KvLookupRequest(block_hashes=[])), timeout=_ATTEMPT_S)
        return True

    async def _heartbeats(self, ready: Ready) -> bool:
        nc = await self._client(ready.url)
        seen: set[str] = set()
        done = asyncio.Event()

        async def on_beat(msg) -> None:
            seen.add(msg.subject)
            if seen >= set(ready.names):
                done.set()

        subs = [await nc.subscribe(subject, cb=on_beat) for subject in ready.names]
        try:
            await done.wait()  # heartbeats come every 0.5 s; the caller's deadline bounds this
            return True
        finally:
            for sub in subs:
                await sub.unsubscribe()


def main(argv: list[str] | None = None) -> None:
    """``python -m libs.lab.readiness KIND URL [NAME...]``: exit 0 if the probe succeeds within 5 s (compose healthchecks)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in ("nats", "redis", "http", "reply", "heartbeats"):
        raise SystemExit("usage: python -m libs.lab.readiness nats|redis|http|reply|heartbeats URL [NAME...]")

    async def probe() -> None:
        probes = Probes()
        try:
            async with asyncio.timeout(5.0):
                await probes.ready(Ready(args[0], args[1], tuple(args[2:])))
        finally:
            await probes.close()

    try:
        asyncio.run(probe())
    except TimeoutError:
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
