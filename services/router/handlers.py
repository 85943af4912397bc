"""One coroutine per subject the router listens to: instance heartbeats and link telemetry."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from libs.common import subjects
from libs.common.handling import decoded_load, decoded_or_none
from libs.common.messages import LinkStats, link_stats_decoder

if TYPE_CHECKING:
    from services.router.service import RouterService

log = logging.getLogger(__name__)


async def handle_load(svc: RouterService, msg: Msg) -> None:
    """Take an ``InstanceLoad`` heartbeat into the live view (malformed ones are counted and dropped)."""
    load = decoded_load(msg, svc.metrics.bad_messages)
    if load is not None:
        svc.view.ingest_load(load)


def _named_sites(stats: LinkStats) -> None:
    """``ValueError`` unless the sample's sites are subject tokens."""
    subjects.token(stats.src_site, "site")
    subjects.token(stats.dst_site, "site")


async def handle_link_stats(svc: RouterService, msg: Msg) -> None:
    """Take a ``LinkStats`` sample into the link telemetry (malformed ones are counted and dropped)."""
    stats = decoded_or_none(link_stats_decoder, msg, "link", svc.metrics.bad_messages, _named_sites)
    if stats is not None:
        svc.view.ingest_link(stats, stats.sender)
