"""The slow timescale, live: the lengths and link readings of first decisions re-plan t, which is published."""

from __future__ import annotations

import msgspec
import numpy as np

from libs.common import subjects
from libs.common.messages import Sampling, ThresholdChanged
from services.router.schemas import GenerationRequest
from tests.router.conftest import PRFAAS, load, ready_router

CASE_STUDY = [load(f"pr{i}", role="prefill", site=PRFAAS, hardware="h200") for i in range(4)]
CASE_STUDY += [load(f"pl{i}", role="prefill", hardware="h20") for i in range(3)]
CASE_STUDY += [load(f"pd{i}", hardware="h20") for i in range(5)]


async def test_replan_publishes_a_new_threshold_from_what_decisions_saw(start_router, nc, kv_index):
    """Case-study lengths under a far-off t: the periodic re-plan applies the planned t, publishes it, and plans for the
    median link the decisions read (50 Gbps: not the 100 Gbps the view says now, nor dragged down by a transient)."""
    svc = await ready_router(
        start_router,
        nc,
        *CASE_STUDY,
        model_profiles={"reference": "kimi-linear-1t"},
        threshold_tokens=1000,
        replan_interval_s=0.2,
        instance_ttl_s=60.0,
    )
    plans = await nc.subscribe(subjects.plans(svc.config.site))
    request = GenerationRequest("text", "reference", "a probe", None, None, 4, Sampling(), False, False)
    first = svc.scheduler.decide(await svc.scheduler.prepare(request, "probe", None))
    lengths = np.clip(np.random.default_rng(0).lognormal(9.90, 1.00, 600), 128, 131_072).astype(int)
    for i, n in enumerate(lengths):
        signals = msgspec.structs.replace(
            first.decision.signals, link_effective_gbps=1.0 if i % 40 == 0 else 50.0, incremental_tokens=int(n)
        )
        svc.replanner.observe(
            msgspec.structs.replace(first, decision=msgspec.structs.replace(first.decision, signals=signals))
        )
    changed = msgspec.json.decode((await plans.next_msg(timeout=20)).data, type=ThresholdChanged)
    assert (changed.old_threshold_tokens, changed.observed_requests, changed.link_gbps) == (1000, 600, 50.0)
    assert 10_000 < changed.threshold_tokens < 40_000  # the case study plans ~19K
    assert svc.scheduler.policy.config.threshold_tokens == changed.threshold_tokens
