"""The router's TTFT histogram has finite buckets up to the longest TTFT its deadlines allow."""

from __future__ import annotations

from services.router.metrics import longest_ttft_s
from services.router.service import RouterService
from tests.router.conftest import router_config


def _finite_bounds_s(service: RouterService) -> list[float]:
    """The upper bounds of the TTFT histogram's finite buckets, as /metrics exports them."""
    [family] = [m for m in service.registry.collect() if m.name == "prfaas_router_ttft_seconds"]
    return sorted({float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")} - {float("inf")})


async def test_the_ttft_histogram_reaches_past_the_longest_ttft_the_router_allows(nc, nats_url) -> None:
    """Default deadlines and a longer first-token deadline: the longest allowed TTFT falls in a finite bucket."""
    for overrides in ({}, {"first_token_timeout_s": 300.0, "max_attempts": 2, "job_timeout_s": 900.0}):
        config = router_config(nats_url, **overrides)
        service = RouterService(nc, config)
        longest = longest_ttft_s(config)
        assert longest >= config.job_timeout_s
        assert longest >= config.max_attempts * (
            config.reserve_timeout_s + config.accept_timeout_s + config.first_token_wait_s
        )
        service.metrics.ttft_seconds.labels("remote").observe(longest)
        bounds = _finite_bounds_s(service)
        assert bounds[-1] >= longest and bounds[-2] < longest, bounds  # reaches it, and no further than one bucket
        top = service.registry.get_sample_value(
            "prfaas_router_ttft_seconds_bucket", {"route": "remote", "le": str(bounds[-1])}
        )
        assert top == 1.0
