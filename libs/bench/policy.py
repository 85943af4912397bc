"""Routing decision latency of every policy on a 32-instance view (target: median <= 50 us).

The view has 8 PrfaaS prefill instances (H200), 8 local prefill and 16 decode instances (H20),
random queue depths and free slots, and one inter-site link; requests draw their length from the
case-study workload and a third of them hit a cached prefix somewhere. Each decision builds the
full RouteDecision event (candidates, signals, predictions), as the router publishes it.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from libs.bench.targets import conclude
from libs.common.errors import BadRequest
from libs.engine.profiles import HARDWARE, MODELS
from libs.planner.search import PlanInputs, planned_threshold
from libs.planner.workloads import CASE_STUDY_WORKLOAD
from libs.policy import POLICIES, ClusterView, InstanceView, LinkView, PolicyConfig, RouteRequest, make_policy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--decisions", type=int, default=5000, help="timed decisions per policy (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def build_view(rng: random.Random) -> ClusterView:
    """A 32-instance view with random load."""
    h200, h20 = HARDWARE["h200"], HARDWARE["h20"]
    instances = [
        InstanceView(f"prfaas-{i}", "dc-prfaas", "prefill", h200, rng.randint(0, 3), rng.uniform(0, 4))
        for i in range(8)
    ]
    instances += [
        InstanceView(f"pd-p{i}", "dc-pd", "prefill", h20, rng.randint(0, 3), rng.uniform(0, 6)) for i in range(8)
    ]
    instances += [
        InstanceView(f"pd-d{i}", "dc-pd", "decode", h20, free_decode_slots=rng.randint(0, 20)) for i in range(16)
    ]
    util = rng.uniform(0, 0.6)
    link = LinkView(
        "dc-prfaas", "dc-pd", 100.0, goodput_gbps=100.0 * util, utilization=util, rtt_s=0.005, active_transfers=3
    )
    return ClusterView(MODELS["kimi-linear-1t"], "dc-pd", tuple(instances), (link,))


def build_requests(rng: random.Random, view: ClusterView, n: int) -> list[RouteRequest]:
    """Requests with case-study lengths; a third find a prefix cached on a random prefill instance."""
    lengths = CASE_STUDY_WORKLOAD.sample(np.random.default_rng(rng.randrange(1 << 30)), n)
    holders = [inst.name for inst in view.instances if inst.role == "prefill"]
    out = []
    for i, length in enumerate(lengths.tolist()):
        cached = {}
        if rng.random() < 1 / 3:
            cached = {rng.choice(holders): int(length * rng.uniform(0.2, 0.9)) // 64 * 64}
        out.append(RouteRequest(f"r{i}", int(length), 1024, cached))
    return out


def case_study_config() -> PolicyConfig:
    """Policy knobs with the threshold the planner derives for the paper's case study."""
    inputs = PlanInputs(
        MODELS["kimi-linear-1t"], HARDWARE["h200"], 4, HARDWARE["h20"], 8, 100.0, CASE_STUDY_WORKLOAD, 1024
    )
    return PolicyConfig(threshold_tokens=planned_threshold(inputs))


def measure(
    policy_name: str, config: PolicyConfig, view: ClusterView, requests: list[RouteRequest], seed: int
) -> np.ndarray:
    """Seconds per decision for each request."""
    policy = make_policy(policy_name, config)
    rng = random.Random(seed)
    for req in requests[:200]:  # warm up
        policy.decide(view, req, now=0.0, rng=rng)
    times = np.empty(len(requests))
    clock = time.perf_counter
    for i, req in enumerate(requests):
        t0 = clock()
        policy.decide(view, req, now=0.0, rng=rng)
        times[i] = clock() - t0
    return times


def run(args: argparse.Namespace) -> int:
    """Time every policy and print p50/p99 (microseconds) with the verdict on the target."""
    if args.decisions < 1:
        raise BadRequest(f"--decisions must be at least 1, got {args.decisions}")
    rng = random.Random(args.seed)
    view = build_view(rng)
    requests = build_requests(rng, view, args.decisions)
    config = case_study_config()
    per_policy = {name: measure(name, config, view, requests, args.seed) * 1e6 for name in POLICIES}
    pooled = np.concatenate(list(per_policy.values()))
    doc = {
        "decision_p50_us": float(np.percentile(pooled, 50)),
        "decision_p99_us": float(np.percentile(pooled, 99)),
        "instances": len(view.instances),
        "decisions": int(pooled.size),
        "policies": {
            name: {"decision_p50_us": float(np.percentile(t, 50)), "decision_p99_us": float(np.percentile(t, 99))}
            for name, t in per_policy.items()
        },
    }
    rows = [f"{'policy':20}{'p50 (us)':>12}{'p99 (us)':>12}"]
    rows += [
        f"{name:20}{f['decision_p50_us']:>12.1f}{f['decision_p99_us']:>12.1f}" for name, f in doc["policies"].items()
    ]
    rows += [
        f"{'all':20}{doc['decision_p50_us']:>12.1f}{doc['decision_p99_us']:>12.1f}",
        f"{doc['decisions']} decisions on a {doc['instances']}-instance view",
    ]
    return conclude(args, doc, "\n".join(rows))
