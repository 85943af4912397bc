"""``prfaas lab case-study``: the paper's three deployments on the lab, their traffic, the keep-up verdict and the search."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import msgspec
import numpy as np
import pytest

from libs.bench.case_study_deploy import Scales, deployments, topology
from libs.bench.case_study_load import VOCAB, PromptBank, Sent, poisson_times, stratified_lengths
from libs.bench.case_study_search import GROWTH, KEEP_UP, Step, StepPlan, _measure, next_rate
from libs.cli import main
from libs.common.errors import ConfigError
from libs.common.hashing import hash_list
from libs.lab.plan import plan
from libs.lab.supervisor import NativeAddresses
from libs.lab.topology import topology_from_dict
from libs.planner.cli_common import inputs_from_args
from libs.planner.workloads import CASE_STUDY_WORKLOAD


def _inputs():
    keys = ("model", "prfaas_hw", "n_prfaas", "pd_hw", "n_pd", "link_gbps", "workload", "output_tokens")
    return inputs_from_args(argparse.Namespace(case_study=True, **dict.fromkeys(keys)))


def test_each_deployment_is_the_planners_configuration_scaled() -> None:
    """PrfaaS-PD 4 + 3/5 static t = 19,392, homogeneous 9/3 local-only, naive 4 + 0/8 remote-only; link and chunk scaled."""
    sc = Scales(time_scale=0.25, byte_scale=0.0001, decode_chunk=16)
    deps = {d.name: d for d in deployments(_inputs())}
    shapes = {n: (d.n_prfaas, d.n_p, d.n_d, d.policy) for n, d in deps.items()}
    assert shapes == {
        "prfaas_pd": (4, 3, 5, "static-threshold"),
        "homogeneous": (0, 9, 3, "local-only"),
        "naive_heterogeneous": (4, 0, 8, "remote-only"),
    }
    assert deps["prfaas_pd"].threshold_tokens == 19_392
    assert deps["prfaas_pd"].lambda_max == pytest.approx(3.235, abs=0.001)
    pd = topology(deps["prfaas_pd"], _inputs(), sc)
    link = pd.links[0]
    assert link.gbps == pytest.approx(100 * 0.0001 / 0.25) and link.rtt_ms == pytest.approx(5.0 * 0.25)
    assert (pd.router.policy, pd.router.threshold_tokens) == ("static-threshold", 19_392)
    homogeneous = topology(deps["homogeneous"], _inputs(), sc)
    assert [(s.name, len(s.clusters)) for s in homogeneous.sites] == [("dc-a", 0), ("dc-b", 1)]
    processes = plan(homogeneous, NativeAddresses(Path("/tmp/unused")))
    decode = [p for p in processes if p.role == "decode_gateway"]
    prefill = [p for p in processes if p.role == "prefill_gateway"]
    assert len(decode) == 3 and all(p.env["DECODE_GATEWAY_DECODE_CHUNK"] == "16" for p in decode)
    assert sum(len(p.env["PREFILL_GATEWAY_INSTANCES"].split(",")) for p in prefill) == 9
    assert all(p.env["PREFILL_GATEWAY_TIME_SCALE"] == "0.25" for p in prefill)


def test_decode_chunk_belongs_to_simulated_decode_instances() -> None:
    """A prefill group with decode_chunk is refused naming the key; a decode group keeps it."""
    raw = {
        "name": "t",
        "model": "kimi-linear-1t",
        "sites": {
            "dc-b": {
                "clusters": {
                    "pd": {
                        "kind": "pd",
                        "instances": [
                            {"role": "prefill", "backend": "simulated", "hardware": "h20", "decode_chunk": 4},
                            {"role": "decode", "backend": "simulated", "hardware": "h20"},
                        ],
                    }
                }
            }
        },
        "services": {"redis": "dc-b", "kv_index": "dc-b", "routers": ["dc-b"]},
        "router": {"threshold_tokens": 0},
        "links": [],
    }
    with pytest.raises(ConfigError, match=r"instances\[0\]\.decode_chunk"):
        topology_from_dict(raw, source="t")
    group = raw["sites"]["dc-b"]["clusters"]["pd"]["instances"]
    group[0].pop("decode_chunk")
    group[1]["decode_chunk"] = 4
    assert topology_from_dict(raw, source="t").sites[0].clusters[0].instances[1].decode_chunk == 4


def test_prompts_have_their_length_and_share_no_block() -> None:
    """Bodies parse as completions with the asked number of ids in the vocabulary; two prompts share no block hash."""
    bank = PromptBank("kimi-linear-1t", 4096, 1024, 64, seed=1)
    bodies = [msgspec.json.decode(bank.body(n)) for n in (1, 64, 65, 4000, 4000)]
    assert [len(b["prompt"]) for b in bodies] == [1, 64, 65, 4000, 4000]
    assert all(0 <= i < VOCAB for b in bodies for i in b["prompt"])
    assert bodies[0]["max_tokens"] == 1024 and bodies[0]["ignore_eos"] and bodies[0]["stream"]
    a, b = (np.asarray(x["prompt"]) for x in bodies[3:])
    assert not set(hash_list(a, 64)) & set(hash_list(b, 64))
    assert a[64:].tolist() == b[64:].tolist()  # only the first block is drawn afresh: bodies are cheap to build


def test_stratified_lengths_take_one_length_from_each_stratum() -> None:
    """Sorted, the i-th of n lengths lies in the workload's i-th n-quantile (within the quantile pool's resolution)."""
    n = 50
    lengths = stratified_lengths(n, np.random.default_rng(3))
    cdf = np.sort(CASE_STUDY_WORKLOAD.cdf(lengths.astype(float)))
    assert np.all(cdf >= np.arange(n) / n - 0.005) and np.all(cdf <= (np.arange(n) + 1) / n + 0.005)


def _step(records) -> Step:
    step = Step(StepPlan("probe", 1.0, 0.0, 10.0, 0), records=records)
    _measure(step, [r for r in records if 0 <= r.sent_at < 10], 0.0, 10.0, Scales(time_scale=1.0))
    return step


def test_each_span_offers_exactly_its_rate_with_exponential_gaps() -> None:
    """A warm-up and a window hold round(rate x span) arrivals each, sorted, inside their span; the gaps stay
    random (coefficient of variation ~1, as a Poisson process's exponential gaps)."""
    rng = np.random.default_rng(7)
    times = poisson_times(2.2, (40.0, 100.0), rng)
    assert np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < 140.0
    assert np.sum(times < 40.0) == 88 and np.sum(times >= 40.0) == 220
    gaps = np.diff(poisson_times(5.0, (2000.0,), rng))
    assert 0.95 < np.std(gaps) / np.mean(gaps) < 1.05


def test_a_rate_keeps_up_when_first_tokens_match_arrivals_and_waiting_stays_flat() -> None:
    """100 arrivals served 0.05 s later keep up; 90% served (a tenth refused) does not; 99% served while a queue builds does not."""
    steady = [Sent(i, 1000, i / 10, i / 10 + 0.05, i / 10 + 5, "ok") for i in range(100)]
    step = _step(steady)
    assert (step.arrivals, step.first_tokens, step.kept_up) == (100, 100, True)
    assert abs(step.waiting_growth) < 1 and step.served_rps == pytest.approx(10.0)
    # Every tenth request refused at once (no capacity): nothing piles up, but a tenth is not served.
    refused = [
        Sent(i, 1000, i / 10, i / 10 + 0.05, i / 10 + 5, "ok")
        if i % 10
        else Sent(i, 1000, i / 10, None, i / 10, "error")
        for i in range(100)
    ]
    step = _step(refused)
    assert (step.first_tokens, step.failures, step.kept_up) == (90, 10, False) and abs(step.waiting_growth) < 1
    # A backlog from before the window served early in it, while the window's own requests wait ever longer:
    # the counts look fine (99 first tokens for 100 arrivals), the waiting requests pile up (+9).
    backlog = [Sent(j, 1000, -3 + j / 10, 0.02 + j / 10) for j in range(30)]
    piling = backlog + [Sent(30 + i, 1000, i / 10, i / 10 + 0.05 + (i / 10) ** 2 / 15) for i in range(100)]
    step = _step(piling)
    assert step.first_tokens >= KEEP_UP * step.arrivals
    assert step.waiting_growth > GROWTH * step.arrivals and not step.kept_up


def test_search_goes_up_while_kept_down_to_what_was_served_then_bisects() -> None:
    """Kept at 3.0: 3.3; failed at 3.0 having served 2.7: 2.7 (served 2.95: 2.85); kept 3.0, failed 3.3: 3.15."""
    failed = Step(StepPlan("probe", 3.0, 0, 1, 0), served_rps=2.7)
    assert next_rate([3.0], []) == pytest.approx(3.3)
    assert next_rate([], [failed]) == pytest.approx(2.7)
    failed.served_rps = 2.95
    assert next_rate([], [failed]) == pytest.approx(2.85)
    assert next_rate([3.0], [Step(StepPlan("probe", 3.3, 0, 1, 0))]) == pytest.approx(3.15)


@pytest.mark.timeout(360)  # two labs started and driven ~65 s each: ~2.5 min on 2 shared cores
def test_prfaas_pd_sustains_more_than_homogeneous_on_the_lab(capsys, tmp_path) -> None:
    """At 2.7 req/s (83% of PrfaaS-PD's Lambda_max, 128% of homogeneous's) PrfaaS-PD keeps up and homogeneous does not."""
    argv = [
        "lab",
        "case-study",
        "--json",
        "--configs",
        "prfaas_pd,homogeneous",
        "--scale",
        "0.4",
        "--probes",
        "1",
        "--first-rps",
        "2.7",
        "--warmup",
        "25",
        "--duration",
        "80",
        "--light-requests",
        "0",
        "--no-load90",
        "--plot",
        str(tmp_path / "cs.png"),
    ]
    code = main(argv)
    doc = json.loads(capsys.readouterr().out)
    pd, homogeneous = doc["configs"]["prfaas_pd"], doc["configs"]["homogeneous"]
    assert pd["probes"][0]["kept_up"] and not homogeneous["probes"][0]["kept_up"]
    assert pd["throughput_rps"] == pytest.approx(2.7)
    assert homogeneous["throughput_rps"] is None
    assert pd["probes"][0]["served_rps"] > homogeneous["probes"][0]["served_rps"] * 1.15
    assert code == 1 and "configs.prfaas_pd.throughput_vs_planner" in doc["missed"]  # 2.7 is 0.83 of 3.235
    assert (tmp_path / "cs.png").stat().st_size > 0
    assert set(pd["cpu_seconds"]) >= {"router-dc-b", "prefill-prfaas-0", "decode-pd-d0", "bench"}


def test_avoidable_wait_is_the_queue_another_instance_of_the_pool_would_have_saved() -> None:
    """Two jobs of 1 s on p0 while p1 idles: the second waited 1 s, all of it avoidable; spread out, none waits."""
    from libs.bench.case_study_report import avoidable_wait
    from libs.common.messages import OutcomeEvent

    def outcome(i: int, instance: str, queue_s: float) -> OutcomeEvent:
        return OutcomeEvent(
            request_id=f"r{i}", ts=0.0, site="dc-b", router="r", model="m", route="local", attempts=1,
            status="ok", prefill_instance=instance, queue_s=queue_s, prefill_s=1.0,
        )  # fmt: skip

    records = [Sent(i, 1000, 0.1 * i, request_id=f"r{i}") for i in range(2)]
    herded = Step(
        StepPlan("light", 1.0, 0, 1, 0), records=records, outcomes=[outcome(0, "p0", 0.0), outcome(1, "p0", 0.9)]
    )
    herded.outcomes.append(outcome(2, "p1", 0.0))
    herded.records.append(Sent(2, 1000, 5.0, request_id="r2"))  # p1 exists, idle until then
    figures = avoidable_wait(herded, Scales(time_scale=0.5))
    assert figures["local"]["queue_s"] == pytest.approx(0.9 / 3 / 0.5)
    assert figures["local"]["avoidable_s"] == pytest.approx(0.9 / 3 / 0.5)
    spread = Step(
        StepPlan("light", 1.0, 0, 1, 0), records=records, outcomes=[outcome(0, "p0", 0.0), outcome(1, "p1", 0.0)]
    )
    assert avoidable_wait(spread, Scales(time_scale=0.5))["local"] == {"queue_s": 0.0, "avoidable_s": 0.0}
    both_busy = Step(
        StepPlan("light", 1.0, 0, 1, 0),
        records=[Sent(i, 1000, at, request_id=f"r{i}") for i, at in enumerate((0.0, 0.0, 0.1))],
        outcomes=[outcome(0, "p0", 0.0), outcome(1, "p1", 0.0), outcome(2, "p0", 0.9)],
    )
    assert avoidable_wait(both_busy, Scales(time_scale=1.0))["local"]["avoidable_s"] == pytest.approx(0.0)


def test_the_lab_verb_names_the_planners_configurations() -> None:
    """The lab verb's light flag module lists the same configurations as the planner (it cannot import them)."""
    from libs.bench import case_study_args
    from libs.planner.cli_common import CONFIG_NAMES

    assert case_study_args.CONFIG_NAMES == CONFIG_NAMES


def test_egress_is_the_served_rate_times_the_remote_share_times_a_finished_transfers_bytes() -> None:
    """Three of four requests remote, two of them finished with 1 MB of KV each, one cut short at the step's end
    (100 KB): egress counts the finished transfers' bytes at the step's first-token rate, not the cut one."""
    from libs.bench.case_study_report import TOKEN_BYTES, egress_gbps
    from libs.common.messages import OutcomeEvent

    def outcome(i: int, route: str, kv_bytes: int, ttft_s: float | None) -> OutcomeEvent:
        return OutcomeEvent(
            request_id=f"r{i}", ts=0.0, site="dc-b", router="r", model="m", route=route, attempts=1, status="ok",
            prompt_tokens=1000, bytes_moved=kv_bytes + TOKEN_BYTES * 1000, ttft_s=ttft_s,
        )  # fmt: skip

    outcomes = [outcome(0, "remote", 10**6, 1.0), outcome(1, "remote", 10**6, 2.0), outcome(2, "remote", 10**5, None)]
    step = Step(StepPlan("probe", 2.0, 0, 10.0, 0), outcomes=[*outcomes, outcome(3, "local", 0, 1.0)])
    step.first_tokens = 20  # 2 per paper second over the 10 s window
    scales = Scales(time_scale=0.5, byte_scale=0.001)
    live_rps = 20 / scales.live_s(10.0)
    assert egress_gbps(step, scales) == pytest.approx(scales.paper_gbps(live_rps * 0.75 * 10**6 * 8 / 1e9))
    step.outcomes = [outcome(3, "local", 0, 1.0)]
    assert egress_gbps(step, scales) is None
