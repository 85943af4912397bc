"""Client of the KV index: where does a prompt's prefix live?"""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NatsClient

from libs.common import subjects
from libs.common.errors import UpstreamTimeout, error_from_code
from libs.common.messages import ErrorReply, KvLookupReply, KvLookupRequest, encode, kv_lookup_result_decoder
from libs.common.telemetry import inject_headers


class KvIndexClient:
    """Ask the KV index over NATS request/reply."""

    def __init__(self, nc: NatsClient, timeout_s: float = 1.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s

    async def lookup(self, block_hashes: list[int], *, hybrid: bool = True, sites: list[str] | None = None) -> KvLookupReply:
        """Usable prefix per site and instance; raises the typed error the index answered."""
        req = KvLookupRequest(block_hashes=block_hashes, hybrid=hybrid, sites=sites)
        try:
            msg = await self.nc.request(subjects.KV_LOOKUP, encode(req), timeout=self.timeout_s, headers=inject_headers())
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
            raise UpstreamTimeout(f"KV index did not answer within {self.timeout_s}s ({type(e).__name__})") from e
        result = kv_lookup_result_decoder.decode(msg.data)
        if isinstance(result, ErrorReply):
            raise error_from_code(result.code, result.message)
        return result
