"""Client of the KV index: where does a prompt's prefix live?"""

from __future__ import annotations

from nats.aio.client import Client as NatsClient

from libs.common import subjects
from libs.common.handling import ask
from libs.common.messages import KvLookupReply, KvLookupRequest, kv_lookup_result_decoder


class KvIndexClient:
    """Ask the KV index over NATS request/reply."""

    def __init__(self, nc: NatsClient, timeout_s: float = 1.0) -> None:
        self.nc = nc
        self.timeout_s = timeout_s

    async def lookup(
        self, block_hashes: list[int], *, hybrid: bool = True, sites: list[str] | None = None
    ) -> KvLookupReply:
        """Usable prefix per site and instance; raises the typed error the index answered."""
        req = KvLookupRequest(block_hashes=block_hashes, hybrid=hybrid, sites=sites)
        return await ask(self.nc, subjects.KV_LOOKUP, req, kv_lookup_result_decoder, self.timeout_s, "the KV index")
