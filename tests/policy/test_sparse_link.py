"""An idle or sparsely used link is not read as scarce: CPU-delayed acks and prefill-paced transfers say nothing of its rate.

The samples are what a kvwire sender publishes in the lab (``prfaas lab up``: 10 Gbps, 20 ms) for 12K-token
remote requests of the reference model on a loaded host: the transfer opens as the prefill starts (a
few KB acknowledged), stays active through seconds of compute with nothing to send, then delivers
12.6 MB at once; every ack's round trip carries 60 ms of CPU delay at the sender or receiver.
"""

from __future__ import annotations

import random

import numpy as np

from libs.common.messages import LinkStats
from libs.engine.profiles import HARDWARE, MODELS
from libs.planner.replan import SlowTimescale
from libs.planner.search import PlanInputs
from libs.planner.workloads import Empirical
from libs.policy import ClusterView, InstanceView, LinkTelemetry, LinkView, PolicyConfig, RouteRequest, make_policy

SRC, DST = "dc-a", "dc-b"
BUDGET_GBPS = 10.0
BASE_RTT_S = 0.020
CPU_DELAY_S = 0.060
MODEL, CPU = MODELS["reference"], HARDWARE["cpu"]
PROMPT = 12_200
KV_BYTES = MODEL.kv_bytes(PROMPT)
OPENING_BYTES = 16 << 10  # manifest-time parts acknowledged as the transfer opens
THRESHOLD = 1_212  # the default lab's t


def _sample(acked_total: int, completed: int, *, acked: int = 0, active: int = 0) -> LinkStats:
    """One second of a sender's LinkStats (kvwire semantics) on the idle-but-for-this 10 Gbps link."""
    goodput = acked * 8 / 1e9
    return LinkStats(
        src_site=SRC,
        dst_site=DST,
        ts=0.0,
        interval_s=1.0,
        budget_gbps=BUDGET_GBPS,
        goodput_gbps=goodput,
        busy_goodput_gbps=goodput if active or acked else 0.0,
        utilization=goodput / BUDGET_GBPS,
        rtt_s=BASE_RTT_S + CPU_DELAY_S,
        min_rtt_s=BASE_RTT_S if acked else 0.0,
        bytes_in_flight=0,
        active_transfers=active,
        acked_bytes_total=acked_total,
        retransmitted_bytes_total=0,
        retransmitted_chunks_total=0,
        transfers_completed_total=completed,
        transfers_failed_total=0,
        sender="p0",
    )


def sparse_remote_requests(requests: int = 3, prefill_s: int = 6, idle_s: int = 5) -> list[LinkStats]:
    """Per second: idle, the transfer opening, prefill compute with nothing to send, the KV at once; repeated."""
    samples: list[LinkStats] = []
    acked = completed = 0
    for _ in range(requests):
        samples += [_sample(acked, completed) for _ in range(idle_s)]
        acked += OPENING_BYTES
        samples.append(_sample(acked, completed, acked=OPENING_BYTES, active=1))
        samples += [_sample(acked, completed, active=1) for _ in range(prefill_s - 1)]
        acked += KV_BYTES - OPENING_BYTES
        completed += 1
        samples.append(_sample(acked, completed, acked=KV_BYTES - OPENING_BYTES))
    return samples + [_sample(acked, completed) for _ in range(idle_s)]


def lab_view(link: LinkView) -> ClusterView:
    """The default lab: one PrfaaS prefill instance at dc-a; one prefill and one decode instance at dc-b."""
    instances = (
        InstanceView("prfaas-p0", SRC, "prefill", CPU),
        InstanceView("pd-p0", DST, "prefill", CPU),
        InstanceView("pd-d0", DST, "decode", CPU, free_decode_slots=256),
    )
    return ClusterView(MODEL, DST, instances, (link,))


def test_sparse_transfers_with_cpu_delayed_acks_keep_the_budget_and_the_next_long_prompt_goes_remote():
    """No sample had KV waiting on the link: the view keeps the budget, a 12K prompt after idling is offloaded."""
    tel = LinkTelemetry()
    readings = []  # the effective bandwidth a decision would have read, each second
    samples = sparse_remote_requests()
    for at, stats in enumerate(samples):
        tel.ingest(stats, float(at))
        readings.append(tel.view(SRC, DST, float(at)).effective_gbps)
    now = float(len(samples) - 1)
    view = tel.view(SRC, DST, now)
    assert view.deliverable_gbps is None and view.effective_gbps == BUDGET_GBPS
    assert min(readings) == BUDGET_GBPS  # not for a second read as less
    assert view.queue_delay_s == 0.0 and view.utilization < 0.01
    for name in ("adaptive", "cost-model"):  # the cost model takes idle local capacity of the same speed, as planned
        decision = make_policy(name, PolicyConfig(threshold_tokens=THRESHOLD)).decide(
            lab_view(view), RouteRequest("next", PROMPT), now=now, rng=random.Random(0)
        )
        assert "bandwidth plentiful" in decision.reason and "t raised" not in decision.reason, decision.reason
        assert decision.choice == "remote" or name == "cost-model", decision.reason


def test_a_replan_from_those_readings_plans_for_the_budget():
    """The slow timescale's median reading is the budget, so t is re-planned as for an idle 10 Gbps link."""
    tel = LinkTelemetry()
    inputs = PlanInputs(MODEL, CPU, 1, CPU, 2, BUDGET_GBPS, Empirical(lengths=[PROMPT]), 8)
    slow = SlowTimescale()
    lab_demo_lengths = np.clip(np.random.default_rng(0).lognormal(np.log(1_200), 1.0, 600), 64, 16_000)
    slow.lengths.extend(int(n) for n in lab_demo_lengths)
    for at, stats in enumerate(sparse_remote_requests()):
        tel.ingest(stats, float(at))
        slow.observe_link(tel.view(SRC, DST, float(at)).effective_gbps)
    measured = slow.measured_link_gbps()
    assert measured == BUDGET_GBPS
    planned = slow.propose(inputs, BUDGET_GBPS, THRESHOLD, 1)
    assert planned is not None and planned[0] < 8_000  # the demo's lengths on an idle link: t of a few thousand
    assert slow.propose(inputs, measured, THRESHOLD, 1) == planned
