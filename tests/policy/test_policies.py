"""Routing policies on hand-built cluster views."""

from __future__ import annotations

import random
from collections import Counter

import msgspec
import pytest

from libs.common.errors import BadRequest, ConfigError, NoCapacity
from libs.common.messages import InstanceLoad, InstancePrefix, KvLookupReply, RouteDecision, json_encoder
from libs.engine.profiles import HARDWARE, MODELS
from libs.policy import POLICIES, ClusterView, InstanceView, LinkView, PolicyConfig, RouteRequest, make_policy

MODEL = MODELS["kimi-linear-1t"]
H200, H20 = HARDWARE["h200"], HARDWARE["h20"]
T = 19_400


def view(
    *,
    utilization: float = 0.1,
    backlog_bytes: int = 0,
    remote_waits: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0),
    local_waits: tuple[float, ...] = (0.0, 0.0, 0.0),
    decode_free: tuple[int, ...] = (20, 20, 20, 20, 20),
    link_gbps: float = 100.0,
) -> ClusterView:
    """The case-study layout: 4 PrfaaS H200 prefill, local H20 prefill and decode, one link."""
    instances = [
        InstanceView(f"prfaas-{i}", "dc-prfaas", "prefill", H200, expected_wait_s=w) for i, w in enumerate(remote_waits)
    ]
    instances += [
        InstanceView(f"pdp-{i}", "dc-pd", "prefill", H20, expected_wait_s=w) for i, w in enumerate(local_waits)
    ]
    instances += [
        InstanceView(f"pdd-{i}", "dc-pd", "decode", H20, free_decode_slots=f) for i, f in enumerate(decode_free)
    ]
    link = LinkView(
        "dc-prfaas",
        "dc-pd",
        link_gbps,
        goodput_gbps=utilization * link_gbps,
        utilization=utilization,
        rtt_s=0.005,
        bytes_in_flight=backlog_bytes,
    )
    return ClusterView(MODEL, "dc-pd", tuple(instances), (link,))


def decide(policy: str, v: ClusterView, tokens: int, cached: dict | None = None, seed: int = 0, **config):
    """One decision with a fresh seeded RNG."""
    p = make_policy(policy, PolicyConfig(threshold_tokens=T, **config))
    return p.decide(v, RouteRequest("r1", tokens, 1024, cached or {}), now=12.5, rng=random.Random(seed))


@pytest.mark.parametrize(("tokens", "choice"), [(T - 1, "local"), (T, "local"), (T + 1, "remote"), (120_000, "remote")])
def test_static_threshold_edges(tokens, choice):
    """Static threshold offloads iff the uncached length is strictly above t."""
    d = decide("static-threshold", view(), tokens)
    assert d.choice == choice
    assert d.prefill_site == ("dc-pd" if choice == "local" else "dc-prfaas")
    assert d.signals.incremental_tokens == tokens
    assert d.transport == "tcp"  # the KV moves between instances, within a site too
    assert (d.transfer_bytes == MODEL.kv_bytes(tokens)) == (choice == "remote")


def test_local_cache_hit_flips_static_decision_and_attracts_the_holder():
    """A prefix cached at the PD site lowers the uncached length below t: local, on the instance holding it."""
    assert decide("static-threshold", view(), 30_000).choice == "remote"
    d = decide("static-threshold", view(), 30_000, cached={"pdp-2": 15_000})
    assert d.choice == "local"
    assert d.prefill_instance == "pdp-2"
    assert d.reused_prefix_tokens == 15_000
    assert d.predicted_prefill_s == pytest.approx(MODEL.prefill_time_s(15_000, H20))


def test_remote_cache_hit_is_used_when_offloading():
    """When offloading, the PrfaaS instance holding the prefix is chosen and its prefix reused."""
    d = decide("static-threshold", view(), 60_000, cached={"prfaas-3": 40_000})
    assert (d.choice, d.prefill_instance, d.reused_prefix_tokens) == ("remote", "prfaas-3", 40_000)
    assert d.transfer_bytes == MODEL.kv_bytes(60_000)  # the decode side still needs all of the KV


def test_adaptive_plentiful_bandwidth_ships_a_remote_prefix():
    """With bandwidth plentiful, the longest prefix anywhere counts and is shipped to the PD site."""
    d = decide("adaptive", view(utilization=0.1), 30_000, cached={"prfaas-1": 20_000})
    assert d.choice == "local"
    assert d.signals.bandwidth == "plentiful"
    assert d.signals.incremental_tokens == 10_000
    assert d.prefix_source_site == "dc-prfaas"
    assert d.shipped_prefix_bytes == MODEL.kv_bytes(20_000)
    assert d.reused_prefix_tokens == 20_000


def test_adaptive_scarce_bandwidth_judges_each_cache_on_its_own():
    """With bandwidth scarce, only the PD site's own cache counts and nothing is shipped."""
    d = decide("adaptive", view(utilization=0.7), 30_000, cached={"prfaas-1": 20_000})
    assert d.signals.bandwidth == "scarce"
    assert d.shipped_prefix_bytes == 0
    assert d.signals.incremental_tokens == 30_000
    assert d.choice == "remote"  # 30K > t, so offload and reuse the PrfaaS cache there
    assert (d.prefill_instance, d.reused_prefix_tokens) == ("prfaas-1", 20_000)


def test_adaptive_raises_threshold_under_link_pressure():
    """Near link saturation (or with a backlog) adaptive raises t and keeps a 25K prompt local; static does not."""
    assert decide("adaptive", view(utilization=0.2), 25_000).choice == "remote"
    for v in (view(utilization=0.97), view(utilization=0.3, backlog_bytes=int(4e9), link_gbps=10.0)):
        d = decide("adaptive", v, 25_000)
        assert d.choice == "local"
        assert d.signals.effective_threshold_tokens > 25_000 > d.signals.threshold_tokens
        assert "raised" in d.reason
        assert decide("static-threshold", v, 25_000).choice == "remote"


def test_adaptive_pressure_is_relieved_by_a_longer_local_queue():
    """A busy local cluster cancels the raise: adaptive keeps offloading long prompts."""
    v = view(utilization=0.95, local_waits=(30.0, 30.0, 30.0))
    assert decide("adaptive", v, 25_000).choice == "remote"


def test_cost_model_uses_idle_remote_capacity_for_a_short_prompt():
    """The cost model moves a short prompt to an idle PrfaaS instance when every local one is busy."""
    v = view(local_waits=(6.0, 6.0, 6.0))
    assert decide("static-threshold", v, 8_000).choice == "local"
    d = decide("cost-model", v, 8_000)
    assert d.choice == "remote"
    assert d.predicted_ttft_s < min(c.ttft_s for c in d.candidates if c.option == "local")


def test_cost_model_keeps_optional_traffic_off_a_busy_link():
    """Over the link budget, the cost model does not add a transfer the plan did not ask for."""
    v = view(local_waits=(6.0, 6.0, 6.0), utilization=0.88, link_gbps=10.0)
    assert decide("cost-model", v, 8_000).choice == "local"


def test_cost_model_does_not_pile_onto_busy_pools():
    """With no idle instance on the other path, the cost model follows the plan."""
    v = view(local_waits=(6.0, 6.0, 6.0), remote_waits=(3.0, 3.0, 3.0, 3.0))
    assert decide("cost-model", v, 8_000).choice == "local"


def test_baselines():
    """local-only and remote-only always take their side, and say so when it does not exist."""
    assert decide("local-only", view(), 120_000).choice == "local"
    assert decide("remote-only", view(), 500).choice == "remote"
    no_local = view(local_waits=())
    d = decide("local-only", no_local, 500)
    assert d.choice == "remote" and "no local prefill instance" in d.reason


def test_instance_choice_prefers_least_expected_wait():
    """A clearly less loaded instance wins every time; the decision reports its wait as the queue."""
    v = view(remote_waits=(5.0, 0.2, 5.0, 5.0))
    for seed in range(20):
        d = decide("static-threshold", v, 50_000, seed=seed)
        assert d.prefill_instance == "prfaas-1"
        assert d.predicted_queue_s == pytest.approx(0.2)


def test_two_routers_do_not_herd_onto_one_instance():
    """Two routers reading the same view spread equal-looking instances instead of all picking one."""
    v = view(remote_waits=(0.0, 0.01, 0.0, 0.02), decode_free=(20, 19, 20, 20, 19))
    routers = [make_policy("static-threshold", PolicyConfig(threshold_tokens=T)) for _ in range(2)]
    rngs = [random.Random(1), random.Random(2)]
    picks = [Counter(), Counter()]
    decode = Counter()
    for i in range(200):
        for r, (policy, rng) in enumerate(zip(routers, rngs, strict=True)):
            d = policy.decide(v, RouteRequest(f"r{i}", 50_000), now=0.0, rng=rng)
            picks[r][d.prefill_instance] += 1
            decode[d.decode_instance] += 1
    for counter in picks:
        assert len(counter) == 4 and min(counter.values()) >= 25  # each instance gets a fair share
    assert len(decode) == 5 and min(decode.values()) >= 30


def test_decision_is_pure_and_deterministic():
    """Same view, request, time and RNG seed give the same decision; ``ts`` is the given ``now``."""
    a = decide("cost-model", view(local_waits=(1.0, 2.0, 0.5)), 33_000, cached={"pdp-0": 4096})
    b = decide("cost-model", view(local_waits=(1.0, 2.0, 0.5)), 33_000, cached={"pdp-0": 4096})
    assert a == b
    assert a.ts == 12.5


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_decision_event_round_trips_as_json_with_consistent_predictions(name):
    """The decision event encodes to JSON and back; candidates are best first; TTFT covers prefill."""
    d = decide(name, view(local_waits=(0.5, 1.0, 0.0)), 40_000, cached={"prfaas-2": 8192})
    raw = json_encoder.encode(d)
    assert msgspec.json.decode(raw, type=RouteDecision) == d
    assert msgspec.json.decode(raw)["type"] == "route.decision.v2"
    assert d.policy == name
    assert d.predicted_ttft_s >= d.predicted_queue_s + d.predicted_prefill_s
    scores = [c.score for c in d.candidates]
    assert scores == sorted(scores) and 1 <= len(scores) <= PolicyConfig(threshold_tokens=T).max_candidates
    assert any(c.instance == d.prefill_instance for c in d.candidates) or d.shipped_prefix_bytes
    assert d.reason


def test_remote_transfer_prediction_grows_with_link_congestion():
    """A backlogged, slower link makes the predicted exposed transfer (and TTFT) longer."""
    calm = decide("remote-only", view(), 60_000)
    busy = decide("remote-only", view(link_gbps=10.0, utilization=0.9, backlog_bytes=int(3e9)), 60_000)
    assert calm.predicted_transfer_s < 0.1
    assert busy.predicted_transfer_s > 1.0
    assert busy.predicted_ttft_s > calm.predicted_ttft_s + 1.0


def test_errors():
    """Unknown policy names and bad config are typed errors; a view without decode is NoCapacity."""
    with pytest.raises(BadRequest, match="static-threshold"):
        make_policy("round-robin", PolicyConfig(threshold_tokens=T))
    with pytest.raises(ConfigError, match="link_budget"):
        PolicyConfig(threshold_tokens=T, link_budget=1.5)
    with pytest.raises(NoCapacity):
        decide("static-threshold", view(decode_free=()), 1000)


def test_view_and_request_from_bus_messages():
    """ClusterView.from_loads and RouteRequest.from_lookup turn heartbeats and lookups into policy inputs."""
    loads = [
        InstanceLoad(site="dc-prfaas", instance="p0", role="prefill", expected_wait_s=1.5),
        InstanceLoad(site="dc-pd", instance="l0", role="prefill", queue_depth=2),
        InstanceLoad(site="dc-pd", instance="d0", role="decode", free_decode_slots=7),
        InstanceLoad(site="dc-pd", instance="ghost", role="decode"),  # no hardware known: left out
    ]
    v = ClusterView.from_loads(
        MODEL, "dc-pd", loads, {"p0": "h200", "l0": "h20", "d0": "h20"}, [LinkView("dc-prfaas", "dc-pd", 100.0)]
    )
    assert [i.name for i in v.local_prefill] == ["l0"]
    assert [i.name for i in v.remote_prefill["dc-prfaas"]] == ["p0"]
    assert [i.name for i in v.decode] == ["d0"]
    reply = KvLookupReply(
        blocks_total=100,
        instances=[
            InstancePrefix(site="dc-pd", instance="l0", attn_kv_blocks=50, linear_state_blocks=50, usable_blocks=50)
        ],
        sites=[],
    )
    req = RouteRequest.from_lookup("r9", 6400, reply, block_size=64)
    assert req.cached_tokens == {"l0": 3200}
    d = make_policy("static-threshold", PolicyConfig(threshold_tokens=T)).decide(v, req, now=0.0, rng=random.Random(0))
    assert (d.choice, d.prefill_instance, d.reused_prefix_tokens) == ("local", "l0", 3200)


def test_cost_model_takes_a_busy_path_that_meets_the_ttft_target():
    """With both pools busy the cost model follows the plan, unless the plan misses the request's TTFT target and the
    other path meets it; a target nothing meets changes nothing; adaptive ignores targets."""
    v = view(local_waits=(6.0, 6.0, 6.0), remote_waits=(3.0, 3.0, 3.0, 3.0))
    p = make_policy("cost-model", PolicyConfig(threshold_tokens=T))

    def choose(policy, slo):
        return policy.decide(v, RouteRequest("r1", 8_000, 1024, {}, slo), now=0.0, rng=random.Random(0))

    assert choose(p, None).choice == "local" and choose(p, 60.0).choice == "local"  # the plan meets a loose target
    met = choose(p, 5.0)
    assert met.choice == "remote" and met.predicted_ttft_s <= 5.0 and "meets the 5.00s target" in met.reason
    assert choose(p, 0.5).choice == "local"  # nothing meets it: as planned
    assert choose(make_policy("adaptive", PolicyConfig(threshold_tokens=T)), 5.0).choice == "local"
