"""NATS subjects, all versioned under ``prfaas.v1``."""

from __future__ import annotations

import re

PREFIX = "prfaas.v1"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def token(value: str, what: str = "subject token") -> str:
    """Validate one subject token (site or instance name): no dots, spaces or wildcards."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} must match [A-Za-z0-9_-]+")
    return value


# KV events: one subject per producing instance; the kv_index stream captures them all.
KV_EVENTS_ALL = f"{PREFIX}.kv.events.>"
KV_EVENTS_STREAM = "PRFAAS_KV_EVENTS"


def kv_events(site: str, instance: str) -> str:
    """Subject on which ``site/instance`` publishes its KV event batches."""
    return f"{PREFIX}.kv.events.{token(site, 'site')}.{token(instance, 'instance')}"


def kv_snapshot_request(site: str, instance: str) -> str:
    """Subject on which the index asks ``site/instance`` for a full snapshot (after a gap)."""
    return f"{PREFIX}.kv.snapshot_request.{token(site, 'site')}.{token(instance, 'instance')}"


KV_LOOKUP = f"{PREFIX}.kv.lookup"

# Instance load heartbeats (also the liveness signal the index uses).
LOAD_ALL = f"{PREFIX}.load.>"


def load(site: str, instance: str) -> str:
    """Subject of ``site/instance``'s load heartbeats."""
    return f"{PREFIX}.load.{token(site, 'site')}.{token(instance, 'instance')}"


# Link telemetry per site pair, published by prefill-side senders.
LINK_ALL = f"{PREFIX}.link.>"


def link(src_site: str, dst_site: str) -> str:
    """Subject of link statistics from ``src_site`` to ``dst_site``."""
    return f"{PREFIX}.link.{token(src_site, 'site')}.{token(dst_site, 'site')}"


def link_share(src_site: str, dst_site: str) -> str:
    """Subject of ``LinkShareAnnounce`` from ``src_site``'s processes on the pair to ``dst_site`` (``*``: all).

    Its own area (``linkshare``, not ``link``): a reader of ``LINK_ALL`` gets link statistics only.
    """
    dst = dst_site if dst_site == "*" else token(dst_site, "site")
    return f"{PREFIX}.linkshare.{token(src_site, 'site')}.{dst}"


# Jobs: the router sends a DecodeJob to one decode instance (request/reply: a reservation), then a
# PrefillJob to a prefill cluster (queue group) or to one of its instances. Cancellations go to
# every gateway on one subject; each acts only on the requests it holds.
def decode_jobs(site: str, instance: str) -> str:
    """Request/reply subject of ``site/instance``'s decode jobs."""
    return f"{PREFIX}.decode.{token(site, 'site')}.{token(instance, 'instance')}"


def decode_resend(site: str, instance: str) -> str:
    """Request/reply subject on which ``site/instance`` sends a request's token chunks again (``ResendTokens``)."""
    return f"{decode_jobs(site, instance)}.resend"


def prefill_jobs(site: str, cluster: str) -> str:
    """Request/reply subject of ``site/cluster``'s prefill jobs (served by a queue group)."""
    return f"{PREFIX}.prefill.{token(site, 'site')}.{token(cluster, 'cluster')}"


def prefill_queue_group(cluster: str) -> str:
    """Queue group of a prefill cluster's gateways."""
    return f"prefill-{token(cluster, 'cluster')}"


def prefill_instance_jobs(site: str, cluster: str, instance: str) -> str:
    """Request/reply subject of one prefill instance (when the router picked it, e.g. for its cache)."""
    return f"{prefill_jobs(site, cluster)}.{token(instance, 'instance')}"


JOB_CANCEL = f"{PREFIX}.jobs.cancel"


def decisions(site: str) -> str:
    """Subject of routing decision events (JSON) made by routers at ``site``."""
    return f"{PREFIX}.decisions.{token(site, 'site')}"


def outcomes(site: str) -> str:
    """Subject of request outcome events (JSON) of routers at ``site``."""
    return f"{PREFIX}.outcomes.{token(site, 'site')}"


def plans(site: str) -> str:
    """Subject of threshold re-plans (JSON) made by routers at ``site``."""
    return f"{PREFIX}.plans.{token(site, 'site')}"


# Decision, outcome and plan events of every site, kept for replay by analytics.
DECISIONS_STREAM = "PRFAAS_DECISIONS"
DECISIONS_ALL = f"{PREFIX}.decisions.>"
OUTCOMES_ALL = f"{PREFIX}.outcomes.>"
PLANS_ALL = f"{PREFIX}.plans.>"


# KV transfer over JetStream: one stream per destination site (placed there), one subject per
# transfer, and a request/reply control subject per decode instance (begin, status, abort).
def kv_transfer_stream(site: str) -> str:
    """Name of the JetStream stream holding KV chunks bound for ``site``."""
    return f"PRFAAS_KV_{token(site, 'site')}"


def kv_transfer_all(site: str) -> str:
    """Subjects captured by ``site``'s KV transfer stream."""
    return f"{PREFIX}.kvx.{token(site, 'site')}.>"


def kv_transfer(site: str, instance: str, transfer_id: str) -> str:
    """Subject carrying one transfer's chunks and end markers to ``site/instance``."""
    return f"{PREFIX}.kvx.{token(site, 'site')}.{token(instance, 'instance')}.{token(transfer_id, 'transfer id')}"


def kv_control(site: str, instance: str) -> str:
    """Request/reply subject on which ``site/instance`` answers KV transfer begin/status/abort."""
    return f"{PREFIX}.kvctl.{token(site, 'site')}.{token(instance, 'instance')}"
