"""Prometheus metrics of the router (one registry per service object)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from libs.policy.breaker import LEVELS, LinkState
from services.router.config import RouterConfig

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def longest_ttft_s(config: RouterConfig) -> float:
    """A bound on a request's TTFT: each attempt may wait out its reserve, accept and first-token deadlines (and a
    job's own deadline is ``job_timeout_s``)."""
    per_attempt_s = config.reserve_timeout_s + config.accept_timeout_s + config.first_token_wait_s
    return max(config.job_timeout_s, config.max_attempts * per_attempt_s)


def _ttft_buckets(longest_s: float) -> tuple[float, ...]:
    """The latency buckets, doubled past 30 s until one reaches ``longest_s`` (no TTFT lands only in +Inf)."""
    buckets = list(_LATENCY_BUCKETS)
    while buckets[-1] < longest_s:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


class _LinkBreakers:
    """``prfaas_router_link_breaker{src_site,dst_site}``: each pair's breaker as it is when scraped."""

    def __init__(self, states: Callable[[], list[LinkState]]) -> None:
        self.states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per pair: 0 closed, 1 half-open, 2 open."""
        family = GaugeMetricFamily(
            "prfaas_router_link_breaker",
            "Link breaker per site pair: 0 closed, 1 half-open (one probe may go), 2 open (routed local)",
            labels=["src_site", "dst_site"],
        )
        for state in self.states():
            family.add_metric([state.src_site, state.dst_site], LEVELS[state.state])
        yield family


class _KvPaths:
    """``prfaas_router_kv_path_up{src_site,dst_site}``: 1 while a KV transfer on the pair may succeed, 0 when none can."""

    def __init__(self, paths: Callable[[], list]) -> None:
        self.paths = paths

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One sample per pair into the router's site (configured or heard from)."""
        family = GaugeMetricFamily(
            "prfaas_router_kv_path_up",
            "Cross-site KV path per pair: 1 up, 0 broken (breaker open, transfers failing, or no LinkStats heard)",
            labels=["src_site", "dst_site"],
        )
        for path in self.paths():
            family.add_metric([path.src_site, path.dst_site], 1 if path.up else 0)
        yield family


class RouterMetrics:
    """Counters and histograms the router updates."""

    def __init__(self, registry: CollectorRegistry, config: RouterConfig) -> None:
        self.registry = registry
        self.requests = Counter(
            "prfaas_router_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry
        )
        self.decisions = Counter("prfaas_router_decisions", "Decisions by route", ["route"], registry=registry)
        self.fallbacks = Counter(
            "prfaas_router_fallbacks",
            "Attempts that failed before the first token and were re-decided",
            registry=registry,
        )
        self.bad_messages = Counter(
            "prfaas_router_bad_messages", "Malformed bus messages", ["source"], registry=registry
        )
        self.index_errors = Counter(
            "prfaas_router_index_errors",
            "Requests routed without cache knowledge because the index failed or was late",
            registry=registry,
        )
        self.cancelled = Counter("prfaas_router_cancelled", "Requests whose client went away", registry=registry)
        self.refused = Counter(
            "prfaas_router_refused",
            "Requests and connections refused before any work: missing_key, wrong_key, rate_limited, too_many_connections",
            ["reason"],
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "prfaas_router_decision_seconds",
            "Tokenize, hash, index lookup, view and policy",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "prfaas_router_ttft_seconds",
            "Arrival to first token, by route",
            ["route"],
            buckets=_ttft_buckets(longest_ttft_s(config)),
            registry=registry,
        )
        self.in_flight = Gauge("prfaas_router_in_flight", "Requests being served", registry=registry)
        self.threshold = Gauge("prfaas_router_threshold_tokens", "Offload threshold t in force", registry=registry)

    def watch_links(self, states: Callable[[], list[LinkState]]) -> None:
        """Publish the link breakers ``states()`` gives, read at each scrape."""
        self.registry.register(_LinkBreakers(states))

    def watch_kv_paths(self, paths: Callable[[], list]) -> None:
        """Publish the KV paths ``paths()`` gives (``LiveView.kv_paths``), read at each scrape."""
        self.registry.register(_KvPaths(paths))
