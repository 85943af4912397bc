"""One coroutine per subject the router listens to: instance heartbeats and link telemetry."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec
from nats.aio.msg import Msg

from libs.common import subjects
from libs.common.messages import instance_load_decoder, link_stats_decoder

if TYPE_CHECKING:
    from services.router.service import RouterService

log = logging.getLogger(__name__)


async def handle_load(svc: RouterService, msg: Msg) -> None:
    """Take an ``InstanceLoad`` heartbeat into the live view (malformed ones are counted and dropped)."""
    try:
        load = instance_load_decoder.decode(msg.data)
        subjects.token(load.site, "site")
        subjects.token(load.instance, "instance")
    except (msgspec.DecodeError, ValueError) as e:
        svc.metrics.bad_messages.labels("load").inc()
        log.warning("malformed load heartbeat", extra={"subject": msg.subject, "error": str(e)})
        return
    svc.view.ingest_load(load)


async def handle_link_stats(svc: RouterService, msg: Msg) -> None:
    """Take a ``LinkStats`` sample into the link telemetry."""
    try:
        stats = link_stats_decoder.decode(msg.data)
    except msgspec.DecodeError as e:
        svc.metrics.bad_messages.labels("link").inc()
        log.warning("malformed link stats", extra={"subject": msg.subject, "error": str(e)})
        return
    svc.view.ingest_link(stats, stats.sender)
