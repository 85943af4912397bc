"""Predicted timings of every way to serve one request, from the live view (shared by all policies).

Options: ``local`` (prefill on a PD-site prefill instance), ``remote`` (prefill at a PrfaaS site,
KV streamed layer by layer to the decode site) and ``local-remote-prefix`` (ship a longer prefix
cached at a PrfaaS site to the PD site, then prefill the rest locally). TTFT of an option is
``max(queue + prefill + exposed transfer, decode-slot wait) + one decode step``.

Transfer with layer-wise overlap: the KV of layer i leaves as soon as layer i is computed, at the
bandwidth a new transfer can expect (the idle part of the link, or at least an equal share among
the active transfers). The link finishes at the latest of (prefill end + last layer), (prefill
start + whole KV) and (current backlog drained + whole KV); what sticks out past the prefill end,
plus the RTT, is the exposed transfer time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from libs.common.errors import NoCapacity
from libs.policy.config import PolicyConfig
from libs.policy.placement import PoolScores, ScoredInstance, pick, pick_decode, score_prefill
from libs.policy.view import ClusterView, InstanceView, LinkView, RouteRequest

LOCAL = "local"
REMOTE = "remote"
LOCAL_REMOTE_PREFIX = "local-remote-prefix"
_MIN_PREFIX_GAIN_TOKENS = 64  # a remote prefix must beat the local one by a block to be worth shipping


@dataclass(slots=True)
class Option:
    """One way to serve the request, on its best instance, with predicted timings."""

    kind: str
    site: str
    chosen: ScoredInstance
    scored: PoolScores  # every instance of the pool
    transfer_s: float  # exposed transfer time (incl. RTT and any prefix shipping)
    transfer_bytes: int
    shipped_prefix_bytes: int
    prefix_source_site: str
    link: LinkView | None
    added_utilization: float  # link utilisation this request adds while it streams
    ttft_s: float

    @property
    def queue_s(self) -> float:
        """Predicted wait before prefill starts (includes waiting for a shipped prefix)."""
        return self.chosen.queue_s

    @property
    def prefill_s(self) -> float:
        """Predicted prefill time of the uncached tokens."""
        return self.chosen.prefill_s


@dataclass(slots=True)
class Evaluation:
    """All options for one request plus the decode placement and the cache facts."""

    local: Option | None
    remote: Option | None
    remote_prefix: Option | None
    decode: InstanceView
    decode_wait_s: float
    first_step_s: float
    cached_local_tokens: int
    cached_remote_tokens: int
    kv_bytes: int

    def options(self) -> list[Option]:
        """The options that exist for this request."""
        return [o for o in (self.local, self.remote, self.remote_prefix) if o is not None]


def _link_finish_s(link: LinkView, kv_bytes: int, start_s: float, prefill_s: float, n_layers: int) -> float:
    """Seconds from now until the link has delivered ``kv_bytes`` streamed during the prefill."""
    share = link.share_bytes_per_s()
    return max(
        start_s + prefill_s + kv_bytes / n_layers / share,  # the last layer leaves after the prefill
        start_s + kv_bytes / share,  # the link, not the prefill, is the bottleneck
        link.backlog_s + kv_bytes / share,  # queued bytes of other transfers slow this one
    )


def _ttft(finish_s: float, transfer_s: float, decode_wait_s: float, first_step_s: float) -> float:
    return max(finish_s + transfer_s, decode_wait_s) + first_step_s


def evaluate(
    view: ClusterView, request: RouteRequest, rng: random.Random, config: PolicyConfig, ship_prefixes: bool = True
) -> Evaluation:
    """Score every option for ``request`` on ``view`` (raises NoCapacity if it cannot be served).

    ``ship_prefixes=False`` skips the ``local-remote-prefix`` option (for policies that never ship).
    """
    model = view.model
    placed = pick_decode(view, rng)
    if placed is None:
        raise NoCapacity(f"no decode instance at site {view.decode_site!r}")
    decode, decode_wait_s = placed
    first_step_s = view.first_step_s(decode)
    kv_bytes = model.kv_bytes(request.prompt_tokens)

    local = None
    cached_local = 0
    if view.local_prefill:
        scored = score_prefill(view, view.local_prefill, request)
        cached_local = scored.best_cached_tokens
        chosen = pick(scored, rng, config)
        ttft = _ttft(chosen.finish_s, 0.0, decode_wait_s, first_step_s)
        local = Option(LOCAL, view.decode_site, chosen, scored, 0.0, 0, 0, view.decode_site, None, 0.0, ttft)

    remote = None
    remote_prefix = None
    cached_remote = 0
    for site, pool in view.remote_prefill.items():
        link = view.link(site, view.decode_site)
        if link is None or not pool:
            continue
        scored = score_prefill(view, pool, request)
        site_cached = scored.best_cached_tokens
        chosen = pick(scored, rng, config)
        finish_link = _link_finish_s(link, kv_bytes, chosen.queue_s, chosen.prefill_s, model.n_layers)
        transfer_s = finish_link - chosen.finish_s + link.rtt_s
        added = kv_bytes * 8 / (max(chosen.prefill_s, 1e-3) * link.effective_gbps * 1e9)
        ttft = _ttft(chosen.finish_s, transfer_s, decode_wait_s, first_step_s)
        option = Option(REMOTE, site, chosen, scored, transfer_s, kv_bytes, 0, site, link, min(added, 1.0), ttft)
        if remote is None or option.ttft_s < remote.ttft_s:
            remote = option
        if site_cached > cached_remote:
            cached_remote = site_cached
            if ship_prefixes and view.local_prefill and site_cached >= cached_local + _MIN_PREFIX_GAIN_TOKENS:
                remote_prefix = _ship_prefix_option(view, request, site, link, site_cached, rng, config)
                remote_prefix.ttft_s = _ttft(remote_prefix.chosen.finish_s, 0.0, decode_wait_s, first_step_s)

    if local is None and remote is None:
        raise NoCapacity(f"no prefill instance reachable from site {view.decode_site!r}")
    return Evaluation(
        local=local,
        remote=remote,
        remote_prefix=remote_prefix,
        decode=decode,
        decode_wait_s=decode_wait_s,
        first_step_s=first_step_s,
        cached_local_tokens=cached_local,
        cached_remote_tokens=cached_remote,
        kv_bytes=kv_bytes,
    )


def _ship_prefix_option(
    view: ClusterView,
    request: RouteRequest,
    site: str,
    link: LinkView,
    prefix_tokens: int,
    rng: random.Random,
    config: PolicyConfig,
) -> Option:
    """Ship ``prefix_tokens`` of cached KV from ``site`` to the PD site, then prefill the rest locally."""
    prefix_bytes = view.model.kv_bytes(prefix_tokens)
    ship_s = link.backlog_s + prefix_bytes / link.share_bytes_per_s() + link.rtt_s
    local = score_prefill(view, view.local_prefill, request, reuse_tokens=prefix_tokens)
    rows = [(max(q, ship_s) + p, max(q, ship_s), p, hit, inst) for _, q, p, hit, inst in local.rows]
    best_finish = min(r[0] for r in rows)
    scored = PoolScores(rows, best_finish, local.best_cached_tokens, max(local.least_wait_s, ship_s))
    chosen = pick(scored, rng, config)
    # The shipment is a burst at full link speed; count it as spread over the request's time to prefill.
    added = min(1.0, prefix_bytes * 8 / (max(chosen.finish_s, 1e-3) * link.effective_gbps * 1e9))
    return Option(LOCAL_REMOTE_PREFIX, view.decode_site, chosen, scored, 0.0, 0, prefix_bytes, site, link, added, 0.0)
