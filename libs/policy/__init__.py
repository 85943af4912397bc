"""Pure scheduling decisions (no I/O): offload rule, cost model, instance choice, the view they read.

Usage: ``policy = make_policy("adaptive", PolicyConfig(threshold_tokens=t))`` (t from
``libs.planner.search.planned_threshold``) then ``policy.decide(view, request, now=now, rng=rng)``
returns a ``RouteDecision``. The router's link view comes from :class:`LinkTelemetry`, fed with the
LinkStats it receives.
"""

from __future__ import annotations

from libs.common.errors import BadRequest
from libs.policy.config import PolicyConfig
from libs.policy.cost import CostModel
from libs.policy.decision import Policy
from libs.policy.offload import Adaptive, LocalOnly, RemoteOnly, StaticThreshold
from libs.policy.telemetry import LinkTelemetry, TelemetryConfig
from libs.policy.view import ClusterView, InstanceView, LinkView, RouteRequest

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (StaticThreshold, Adaptive, CostModel, LocalOnly, RemoteOnly)
}


def make_policy(name: str, config: PolicyConfig) -> Policy:
    """The policy called ``name`` (BadRequest lists the known names)."""
    try:
        return POLICIES[name](config)
    except KeyError:
        raise BadRequest(f"unknown policy {name!r}; known: {', '.join(POLICIES)}") from None


__all__ = [
    "POLICIES",
    "ClusterView",
    "InstanceView",
    "LinkTelemetry",
    "LinkView",
    "Policy",
    "PolicyConfig",
    "RouteRequest",
    "TelemetryConfig",
    "make_policy",
]
